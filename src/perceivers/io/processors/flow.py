"""Optical-flow preprocessing: 3×3 patches of both frames, folded together (DeepMind's flow model)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ...configurable import configurable
from ...validation import check_tensor
from ..positions import build_position_encoding, has_grid_rows
from .base import Preprocessed
from .image import ImagePreprocessor

__all__ = ["FlowPreprocessor", "patches_for_flow"]

PATCH_SIZE = 3  # DeepMind's flow model: 3×3 patches of each frame


def patches_for_flow(frames: Tensor, kernel_size: int = PATCH_SIZE) -> Tensor:
    """Frame pairs ``[B, T, C, H, W]`` → zero-padded ``k×k`` patches ``[B, T, k·k·C, H, W]``.

    Channel order is ``(dy, dx, c)`` — ``tf.image.extract_patches`` / transformers' convention —
    so for RGB ``k = 3``: channel ``(3·dy + dx)·3 + c``. Padding is 0 *after* normalisation.
    """
    if frames.ndim != 5:
        raise ValueError(f"frames must be [batch, time, channels, H, W], got shape {tuple(frames.shape)}")
    b, t, c, h, w = frames.shape
    pad = kernel_size // 2
    cols = F.unfold(frames.reshape(b * t, c, h, w), kernel_size, padding=pad)  # [B·T, C·k·k, H·W], (c, dy, dx)
    cols = rearrange(cols, "n (c kk) (h w) -> n (kk c) h w", c=c, h=h)
    return cols.reshape(b, t, -1, h, w)


@configurable
class FlowPreprocessor(ImagePreprocessor):
    """Two frames → per-pixel tokens ``[B, H·W, num_channels]``.

    Accepts transformers' patch input ``[B, 2, 27, H, W]`` or raw frame pairs ``[B, 2, 3, H, W]``
    (already normalised to [−1, 1]; patches are then made with :func:`patches_for_flow`). The
    patches of both frames are folded into 54 channels, projected by ``Linear`` to ``num_channels``
    and concatenated with 2-D Fourier features (frequencies from ``max_resolution``).
    """

    def __init__(
        self,
        *,
        image_size: Sequence[int] = (368, 496),
        num_bands: int = 64,
        max_resolution: Sequence[float] | None = None,
        num_channels: int = 64,
        frame_channels: int = 3,
    ) -> None:
        pos = build_position_encoding(
            "fourier", num_dims=2, index_shape=tuple(image_size), num_bands=num_bands,
            max_resolution=tuple(image_size) if max_resolution is None else tuple(max_resolution),
        )
        super().__init__(
            "patches", in_channels=PATCH_SIZE**2 * frame_channels, position_encoding=pos, spatial_downsample=1,
            temporal_downsample=2, num_channels=num_channels, conv_after_patching=True,
        )
        self.frame_channels = frame_channels
        self.image_size = tuple(int(n) for n in image_size)

    def streams(self, x: Tensor) -> bool:
        """Whether ``forward(x, chunk_size=n)`` gives a stream: a frame pair (raw or patched) with
        positions that give rows alone. Each chunk's patches are made from its rows and one row on
        either side, so neither the patches nor the tokens of the whole image ever exist."""
        return (isinstance(x, Tensor) and x.ndim == 5 and x.shape[1] == 2
                and x.shape[2] in (self.frame_channels, self.in_channels) and has_grid_rows(self.position_encoding))

    def forward(self, x: Tensor, *, chunk_size: int = 0) -> Preprocessed:
        """Frames ``[B, 2, C, H, W]`` → tokens ``[B, H·W, num_channels]`` (a
        :class:`~perceivers.layers.ContextStream` of them with ``chunk_size > 0``, as
        :meth:`ImagePreprocessor.forward`)."""
        check_tensor(x, "flow inputs", kind="float", layout="[batch, 2, C, H, W]")
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"flow inputs must be [batch, 2, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] not in (self.frame_channels, self.in_channels):
            raise ValueError(
                f"flow inputs need {self.frame_channels} (frames) or {self.in_channels} (3x3 patches) channels "
                f"on axis 2, got shape {tuple(x.shape)}"
            )
        if chunk_size > 0 and self.streams(x):
            return super().forward(x, chunk_size=chunk_size)
        return super().forward(self._patches(x))

    def _patches(self, x: Tensor) -> Tensor:
        """Raw frames → their 3×3 patches; patches pass through."""
        return patches_for_flow(x, PATCH_SIZE) if x.shape[2] == self.frame_channels else x

    def _check_shape(self, x: Tensor) -> None:
        if not (x.ndim == 5 and x.shape[2] == self.frame_channels):  # raw frames are patched chunk by chunk
            super()._check_shape(x)

    def _row_features(self, x: Tensor, r0: int, r1: int) -> Tensor:
        """Features of pixel rows ``r0:r1`` (a token per pixel) → ``[B, r1 - r0, W, C']``; raw frames are
        patched from those rows and a halo of ``PATCH_SIZE // 2`` rows on either side."""
        if x.shape[2] == self.in_channels:
            return self._features(x[..., r0:r1, :])
        halo = PATCH_SIZE // 2
        a, b = max(r0 - halo, 0), min(r1 + halo, x.shape[-2])
        return self._features(self._patches(x[..., a:b, :])[..., r0 - a : r1 - a, :])

    def _gather(self, x: Tensor, index_shape: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        """The tokens of a frame pair ``[B, 2, C, H, W]`` by position (an exported program with a dynamic size gathers
        them in a ``torch.while_loop``): flat pixel positions ``index`` (int64 ``[n]``) → ``[B, n, num_channels]``.
        A token's 54 values are gathered from both frames, ``(frame, dy, dx, c)``: from its 3×3 neighbourhood in raw
        frames (zeros beyond the border, as :func:`patches_for_flow` pads), from its own pixel in patched ones."""
        c, height, width = x.shape[2:]
        pixels = x.reshape(x.shape[0], -1)  # [B, 2·C·H·W] (a view of contiguous frames)
        raw = c == self.frame_channels
        # per frame and channel: its offset in the flat frames; raw frames: per neighbour (dy, dx) too
        planes = torch.arange(2 * c, device=x.device).reshape(2, c) * (height * width)  # [2, C]
        shifts = torch.arange(-(PATCH_SIZE // 2), PATCH_SIZE // 2 + 1, device=x.device)
        dy, dx = shifts.repeat_interleave(PATCH_SIZE), shifts.repeat(PATCH_SIZE)  # [9], (dy, dx) row-major
        enc = self.position_encoding
        points = None if enc is None else enc.grid_gather(index_shape, device=x.device, dtype=x.dtype)

        def rows(index: Tensor) -> Tensor:
            r = torch.div(index, width, rounding_mode="floor")
            col = index - r * width
            if not raw:  # patched: a token is its own pixel's 27 channels of each frame
                flat = index[:, None, None] + planes  # [n, 2, 27]
                y = pixels.index_select(1, flat.flatten()).unflatten(1, (index.shape[0], -1))
                return self._token_rows(y, index, points)
            rr, cc = r[:, None] + dy, col[:, None] + dx  # [n, 9]: the neighbours' rows and columns
            inside = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
            neighbour = rr.clamp(0, height - 1) * width + cc.clamp(0, width - 1)  # [n, 9]
            flat = neighbour[:, None, :, None] + planes[:, None]  # [n, 2, 9, C]: (frame, dy, dx, c)
            y = pixels.index_select(1, flat.flatten()).unflatten(1, (index.shape[0], -1))  # [B, n, 2·9·C]
            keep = inside[:, None, :, None].expand(-1, 2, -1, c).flatten(1)  # [n, 2·9·C]
            return self._token_rows(y * keep.to(y.dtype), index, points)

        return rows
