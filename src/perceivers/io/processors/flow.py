"""Optical-flow preprocessing: 3×3 patches of both frames, folded together (DeepMind's flow model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ...configurable import configurable
from ...validation import check_tensor
from ..positions import build_position_encoding
from .base import Preprocessed
from .image import ImagePreprocessor

__all__ = ["FlowPreprocessor", "patches_for_flow"]


def patches_for_flow(frames: Tensor, kernel_size: int = 3) -> Tensor:
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
            "patches", in_channels=9 * frame_channels, position_encoding=pos, spatial_downsample=1,
            temporal_downsample=2, num_channels=num_channels, conv_after_patching=True,
        )
        self.frame_channels = frame_channels
        self.image_size = tuple(int(n) for n in image_size)

    def forward(self, x: Tensor) -> Preprocessed:
        check_tensor(x, "flow inputs", kind="float", layout="[batch, 2, C, H, W]")
        if x.ndim != 5 or x.shape[1] != 2:
            raise ValueError(f"flow inputs must be [batch, 2, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] == self.frame_channels:
            x = patches_for_flow(x)
        elif x.shape[2] != self.in_channels:
            raise ValueError(
                f"flow inputs need {self.frame_channels} (frames) or {self.in_channels} (3x3 patches) channels "
                f"on axis 2, got shape {tuple(x.shape)}"
            )
        return super().forward(x)
