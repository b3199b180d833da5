"""Image and video preprocessing (DeepMind's ``ImagePreprocessor``).

Inputs use the PyTorch layout — images ``[B, C, H, W]``, videos ``[B, T, C, H, W]`` — and are moved
to channels-last before tokens are flattened, so tokens are row-major over ``(T,) H, W`` and patch
channels are ordered ``(dt, dh, dw, c)`` exactly as in the official code.

``prep_type``:

* ``"pixels"``: raw values (optionally strided by ``spatial_downsample`` / ``temporal_downsample``);
* ``"conv"``: :class:`ConvDownsample` — per 4× downsampling one 7×7 stride-2 conv (TF 'SAME',
  no bias), BatchNorm, ReLU and a 3×3 stride-2 max-pool (TF 'SAME', −inf padding); or, with
  ``conv_padding="symmetric"``, as transformers' port computes it (3 pixels of zeros on every side of
  the conv, an unpadded pool: 224 → 55 tokens a side instead of 56);
* ``"conv1x1"``: a 1×1 conv with bias and stride ``spatial_downsample``;
* ``"patches"``: space-to-depth (``temporal_downsample`` × ``spatial_downsample``²), optionally
  followed by ``Linear`` (``conv_after_patching``); a time axis of length 1 is dropped (optical flow).

Large images can be streamed (``forward(x, chunk_size=n)``): the tokens are then a
:class:`~perceivers.layers.ContextStream` whose chunks hold whole token rows, built from those
pixels and the position features of those positions only, so nothing of the whole image's token
array ever exists. This works wherever a token depends on its own pixels alone (``"pixels"``,
``"patches"``, ``"conv1x1"``; not the 7×7 ``"conv"`` stem) and the positions give rows alone; a video not
downsampled in time streams its token rows frame after frame. With a
symbolic image or video size (``torch.export`` with dynamic T, H and W) the stream gives its tokens by position
instead (``ContextStream.rows``: each token's pixels from its own frame, positions from per-axis tables), which the
encoder's cross-attention gathers in a ``torch.while_loop``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ...configurable import configurable
from ...layers import ContextStream, FourierPositionEncoding, GridContext, grid_attention, onnx_loops
from ...layers.dense import Linear
from ...validation import check_count, check_tensor
from ..positions import has_grid_rows
from .base import Preprocessed, add_positions, check_pos_mode

__all__ = ["ConvDownsample", "ImagePreprocessor", "conv_stem_size", "same_padding", "space_to_depth"]

PrepType = Literal["pixels", "conv", "conv1x1", "patches"]


def _lazily(make: Callable[[], Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    """``make()``'s function, made on its first call."""
    made: list[Callable[[Tensor], Tensor]] = []

    def call(index: Tensor) -> Tensor:
        if not made:
            made.append(make())
        return made[0](index)

    return call


def _ceil_div(n: int, d: int) -> int:
    """``⌈n / d⌉`` for ``n ≥ 0``, ``d > 0`` without negative operands: ONNX divides integers truncating toward
    zero, so ``-(-n // d)`` of a symbolic size became ``⌊n / d⌋`` in an exported file."""
    return (n + d - 1) // d


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow/JAX 'SAME' padding ``(before, after)`` along one axis (the extra pixel goes after)."""
    out = _ceil_div(size, stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def space_to_depth(x: Tensor, *, temporal_block: int = 1, spatial_block: int = 1) -> Tensor:
    """Channels-last ``[B, H, W, C]`` or ``[B, T, H, W, C]`` → blocks folded into channels ``(dt, dh, dw, c)``."""
    s, t = spatial_block, temporal_block
    if x.ndim == 4:
        return rearrange(x, "b (h dh) (w dw) c -> b h w (dh dw c)", dh=s, dw=s)
    if x.ndim == 5:
        return rearrange(x, "b (t dt) (h dh) (w dw) c -> b t h w (dt dh dw c)", dt=t, dh=s, dw=s)
    raise ValueError(f"space_to_depth expects a 4-D or 5-D channels-last tensor, got shape {tuple(x.shape)}")


ConvPadding = Literal["same", "symmetric"]


def check_conv_padding(padding: str) -> None:
    """Raise a ValueError unless ``padding`` names a conv stem: ``"same"`` or ``"symmetric"``."""
    if padding not in ("same", "symmetric"):
        raise ValueError(f"conv_padding must be 'same' (DeepMind) or 'symmetric' (transformers), got {padding!r}")


def conv_stem_size(n: int, padding: ConvPadding = "same") -> int:
    """The length an axis of length ``n`` keeps through one conv-stem layer (conv 7×7/2, max-pool 3×3/2)."""
    if padding == "same":
        return _ceil_div(n, 4)
    return (_ceil_div(n, 2) - 3) // 2 + 1  # conv over n + 6 zeros, then an unpadded pool


class _ConvDownsampleLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, use_batchnorm: bool, padding: ConvPadding = "same") -> None:
        super().__init__()
        check_conv_padding(padding)
        self.padding = padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1) if use_batchnorm else None

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == "symmetric":
            x = self.conv(F.pad(x, (3, 3, 3, 3)))
            if self.norm is not None:
                x = self.norm(x)
            return F.max_pool2d(F.relu(x), kernel_size=3, stride=2)
        h, w = x.shape[-2:]
        (top, bottom), (left, right) = same_padding(h, 7, 2), same_padding(w, 7, 2)
        x = self.conv(F.pad(x, (left, right, top, bottom)))
        if self.norm is not None:
            x = self.norm(x)
        x = F.relu(x)
        h, w = x.shape[-2:]
        (top, bottom), (left, right) = same_padding(h, 3, 2), same_padding(w, 3, 2)
        x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, kernel_size=3, stride=2)


@configurable
class ConvDownsample(nn.Module):
    """``num_layers`` × (conv 7×7/2 SAME → BatchNorm → ReLU → max-pool 3×3/2 SAME): 4× per layer, NCHW.

    BatchNorm uses eps 1e-5 and momentum 0.1 (Haiku decay 0.9); in eval mode it uses the running
    statistics (Haiku's EMA ``average``). ``padding="symmetric"``: transformers' stem instead (3 pixels
    of zeros around the conv's input, an unpadded pool).
    """

    def __init__(self, in_channels: int = 3, num_channels: int = 64, *, num_layers: int = 1,
                 use_batchnorm: bool = True, padding: ConvPadding = "same") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _ConvDownsampleLayer(in_channels if i == 0 else num_channels, num_channels, use_batchnorm, padding)
            for i in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, num_channels, ≈H/4^L, ≈W/4^L]``."""
        for layer in self.layers:
            x = layer(x)
        return x


@configurable
class ImagePreprocessor(nn.Module):
    """Images/videos → tokens ``[B, M, num_channels]`` with position features.

    Args:
        prep_type: ``"pixels"``, ``"conv"``, ``"conv1x1"`` or ``"patches"`` (see the module docstring).
        in_channels: channels of the input (3 for RGB; 27 for optical-flow patches).
        position_encoding: a module ``(index_shape) -> [N, Cp]`` from :mod:`perceivers.io.positions`
            (or a ``FourierPositionEncoding``), or ``None`` for no positions.
        spatial_downsample, temporal_downsample: downsampling factors (``"conv"`` needs a power of 4).
        num_channels: output width of the conv / 1×1 conv / ``conv_after_patching`` Linear.
        conv_after_patching: apply ``Linear`` to the patches (``"patches"`` only).
        conv_padding: ``"conv"`` only: ``"same"`` (DeepMind) or ``"symmetric"`` (transformers' port).
        concat_or_add_pos: ``"concat"`` (``[features, positions]``) or ``"add"``.

    Attributes:
        num_channels: channels of the output tokens.
        feature_channels: channels before positions (``inputs_without_pos``).
    """

    def __init__(
        self,
        prep_type: PrepType = "conv",
        *,
        in_channels: int = 3,
        position_encoding: nn.Module | None = None,
        spatial_downsample: int = 4,
        temporal_downsample: int = 1,
        num_channels: int = 64,
        conv_after_patching: bool = False,
        concat_or_add_pos: Literal["concat", "add"] = "concat",
        use_batchnorm: bool = True,
        conv_padding: ConvPadding = "same",
    ) -> None:
        super().__init__()
        check_conv_padding(conv_padding)
        if prep_type not in ("pixels", "conv", "conv1x1", "patches"):
            raise ValueError(f"prep_type must be 'pixels', 'conv', 'conv1x1' or 'patches', got {prep_type!r}")
        check_count(spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample)
        self.prep_type = prep_type
        self.in_channels = in_channels
        self.spatial_downsample, self.temporal_downsample = spatial_downsample, temporal_downsample
        self.concat_or_add_pos = concat_or_add_pos
        self.conv_after_patching = conv_after_patching
        self.stem: nn.Module | None = None
        self.patches_linear: nn.Linear | None = None
        if prep_type == "conv":
            num_layers = round(math.log(spatial_downsample, 4)) if spatial_downsample > 1 else 0
            if num_layers < 1 or 4**num_layers != spatial_downsample:
                raise ValueError(f"prep_type='conv' needs spatial_downsample = 4, 16, ..., got {spatial_downsample}")
            if temporal_downsample != 1:
                raise ValueError("prep_type='conv' does not downsample in time")
            self.stem = ConvDownsample(in_channels, num_channels, num_layers=num_layers, use_batchnorm=use_batchnorm,
                                       padding=conv_padding)
            features = num_channels
        elif prep_type == "conv1x1":
            if temporal_downsample != 1:
                raise ValueError("prep_type='conv1x1' does not downsample in time")
            self.stem = nn.Conv2d(in_channels, num_channels, kernel_size=1, stride=spatial_downsample)
            features = num_channels
        elif prep_type == "patches":
            features = in_channels * spatial_downsample**2 * temporal_downsample
            if conv_after_patching:
                self.patches_linear = Linear(features, num_channels)
                features = num_channels
        else:
            features = in_channels
        self.feature_channels = features
        self.position_encoding = position_encoding
        self.num_channels = check_pos_mode(concat_or_add_pos, features, position_encoding)

    def output_index_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Index shape of the tokens for an input of shape ``[B, (T,) C, H, W]`` (the position grid)."""
        *lead, _, h, w = input_shape
        t = lead[1] if len(lead) == 2 else None
        s, td = self.spatial_downsample, self.temporal_downsample
        if self.prep_type == "conv":
            for layer in self.stem.layers:
                h, w = conv_stem_size(h, layer.padding), conv_stem_size(w, layer.padding)
        elif self.prep_type in ("conv1x1", "pixels"):
            h, w = _ceil_div(h, s), _ceil_div(w, s)
            t = None if t is None else (_ceil_div(t, td) if self.prep_type == "pixels" else t)
        else:  # patches
            h, w = h // s, w // s
            t = None if t is None or t // td == 1 else t // td
        return (h, w) if t is None else (t, h, w)

    def _check_shape(self, x: Tensor) -> None:
        if x.ndim not in (4, 5):
            raise ValueError(f"expected images [B, C, H, W] or videos [B, T, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (axis -3), got shape {tuple(x.shape)}")
        s, t = self.spatial_downsample, self.temporal_downsample
        h, w = x.shape[-2:]
        if self.prep_type == "patches" and (h % s or w % s or (x.ndim == 5 and x.shape[1] % t)):
            raise ValueError(f"patches need H, W divisible by {s} (and T by {t}), got shape {tuple(x.shape)}")

    def _features(self, x: Tensor) -> Tensor:
        """``[B, (T,) C, H, W]`` → channels-last features ``[B, (T,) h, w, C']``."""
        self._check_shape(x)
        s, t = self.spatial_downsample, self.temporal_downsample
        if self.prep_type in ("conv", "conv1x1"):
            lead = x.shape[:-3]
            y = self.stem(x.reshape(-1, *x.shape[-3:]))  # [B·T, C', h, w]
            y = y.reshape(*lead, *y.shape[-3:])
            return y.movedim(-3, -1)
        x = x.movedim(-3, -1)  # channels-last
        if self.prep_type == "pixels":
            if x.ndim == 4:
                return x[:, ::s, ::s]
            return x[:, ::t, ::s, ::s]
        # patches
        y = space_to_depth(x, temporal_block=t, spatial_block=s)
        if y.ndim == 5 and y.shape[1] == 1:
            y = y[:, 0]  # optical flow: both frames folded into channels
        if self.patches_linear is not None:
            y = self.patches_linear(y)
        return y

    def streams(self, x: Tensor) -> bool:
        """Whether ``forward(x, chunk_size=n)`` gives a stream: an image ``[B, C, H, W]`` (or a video
        ``[B, T, C, H, W]`` not downsampled in time), a token made of its own pixels only (``"pixels"``, ``"patches"``, ``"conv1x1"``) and positions that
        give rows alone (Fourier, trainable, projected; or none)."""
        if not (isinstance(x, Tensor) and self.prep_type != "conv" and has_grid_rows(self.position_encoding)):
            return False
        # a video [B, T, C, H, W] whose frames stay token frames: rows of every frame in turn (a symbolic size, under
        # torch.export: tokens by position)
        return x.ndim == 4 or (x.ndim == 5 and self.temporal_downsample == 1
                               and len(self.output_index_shape(tuple(x.shape))) == 3)

    def gives_grid(self, x: Tensor) -> bool:
        """Whether the stream of ``x`` carries a :class:`~perceivers.layers.GridContext` (an image's pixels
        with concatenated Fourier positions), which the native grid kernel can attend."""
        return (self.streams(x) and x.ndim == 4 and self.prep_type == "pixels" and self.concat_or_add_pos == "concat"
                and isinstance(self.position_encoding, FourierPositionEncoding))

    def forward(self, x: Tensor, *, chunk_size: int = 0) -> Preprocessed:
        """``[B, C, H, W]`` / ``[B, T, C, H, W]`` → ``Preprocessed(inputs [B, M, num_channels], None, features)``.

        With ``chunk_size > 0`` and :meth:`streams` true, ``inputs`` is instead a
        :class:`~perceivers.layers.ContextStream` of the same tokens in chunks of about ``chunk_size``
        (whole token rows), and ``inputs_without_pos`` is ``None``.
        """
        check_tensor(x, "images", kind="float", layout="[B, C, H, W] or [B, T, C, H, W]")
        if chunk_size > 0 and self.streams(x):
            return Preprocessed(self._stream(x, chunk_size), None, None)
        y = self._features(x)
        index_shape = tuple(y.shape[1:-1])
        features = y.reshape(y.shape[0], -1, y.shape[-1])  # [B, M, C']
        inputs = add_positions(features, index_shape, self.position_encoding, self.concat_or_add_pos)
        return Preprocessed(inputs, None, features)

    # ------------------------------------------------------------------ streaming

    def _row_features(self, x: Tensor, r0: int, r1: int) -> Tensor:
        """Features of token rows ``r0:r1`` of an image ``[B, C, H, W]`` → ``[B, r1 - r0, w, C']``."""
        s = self.spatial_downsample
        if self.prep_type == "pixels":
            return x[:, :, r0 * s : r1 * s : s, ::s].movedim(1, -1)
        if self.prep_type == "conv1x1":  # 1×1 kernel, stride s: token row r reads pixel row r·s
            return self.stem(x[:, :, r0 * s : (r1 - 1) * s + 1]).movedim(1, -1)
        y = space_to_depth(x[:, :, r0 * s : r1 * s].movedim(1, -1), spatial_block=s)  # patches
        return y if self.patches_linear is None else self.patches_linear(y)

    def _video_row_features(self, x: Tensor, r0: int, r1: int, h: int) -> Tensor:
        """Features of token rows ``r0:r1`` of a video ``[B, T, C, H, W]`` whose frames have ``h`` token rows
        (rows counted over all frames) → ``[B, r1 - r0, w, C']``."""
        parts = [self._row_features(x[:, t], max(r0, t * h) - t * h, min(r1, (t + 1) * h) - t * h)
                 for t in range(r0 // h, -(-r1 // h))]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _stream(self, x: Tensor, chunk_size: int) -> ContextStream:
        """The tokens of an image as a stream of whole token rows (features, then positions)."""
        self._check_shape(x)
        b = x.shape[0]
        index_shape = self.output_index_shape(x.shape)
        w = index_shape[-1]
        enc, mode = self.position_encoding, self.concat_or_add_pos
        video = len(index_shape) == 3  # token frames: rows of every frame in turn
        features = (lambda x, r0, r1: self._video_row_features(x, r0, r1, index_shape[1])) if video else \
            self._row_features

        def chunk(start: int, stop: int) -> Tensor:
            r0, r1 = start // w, -(-stop // w)
            feats = features(x, r0, r1).flatten(1, 2)  # [B, (r1 - r0)·w, C'] (a view of pixels)
            feats = feats[:, start - r0 * w : stop - r0 * w]  # [B, n, C']
            if enc is None:
                return feats
            if mode == "add":
                return feats + enc.grid_rows(index_shape, start, stop, device=x.device, dtype=feats.dtype)
            # [features, positions] assembled in place: one pass over the chunk
            out = feats.new_empty(b, stop - start, self.num_channels)  # [B, n, C' + Cp]
            c = feats.shape[-1]
            if isinstance(enc, FourierPositionEncoding) and not torch.compiler.is_compiling():
                # written straight into the chunk (dynamo traces no out= into a strided view)
                enc.grid_rows(index_shape, start, stop, device=x.device, out=out[..., c:])
            else:
                out[..., c:] = enc.grid_rows(index_shape, start, stop, device=x.device, dtype=feats.dtype)
            out[..., :c] = feats  # last: out= writes above must not see a tensor that requires grad
            return out

        dtype = x.dtype  # what the layers give: under autocast a learned stem computes in its dtype
        if (self.prep_type == "conv1x1" or self.patches_linear is not None) and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        length = math.prod(index_shape)
        gather = self._gather_video if video else self._gather
        grid = None
        # the grid kernel scores the positions per axis (a symbolic size: where a torch.export program keeps it)
        if self.gives_grid(x) and (isinstance(length, int) or grid_attention.serves(x, masked=False)):
            s = self.spatial_downsample
            grid = GridContext(x[:, :, ::s, ::s].movedim(1, -1), index_shape,
                               tuple(enc.axis_tables(index_shape, x.device)))
        if not isinstance(length, int):  # a symbolic size (torch.export): a torch.while_loop gathers rows by position
            return ContextStream(b, length, self.num_channels, chunk, chunk_size, dtype=dtype, device=x.device,
                                 grid=grid, rows=gather(x, index_shape))
        # eager mode reads chunks: the gather is set up (a flat copy of a non-contiguous input) only if asked; an ONNX
        # export loops over a fixed size too (onnx_loops), whose body must not set it up
        rows = gather(x, index_shape) if onnx_loops() else _lazily(lambda: gather(x, index_shape))
        size = max(w, chunk_size - chunk_size % w)
        return ContextStream(b, length, self.num_channels, chunk, size, dtype=dtype, device=x.device, grid=grid,
                             rows=rows)

    def _gather(self, x: Tensor, index_shape: tuple[int, int]) -> Callable[[Tensor], Tensor]:
        """The tokens of an image ``[B, C, H, W]`` by position: flat token positions ``index`` (int64 ``[n]``) →
        ``[B, n, num_channels]``, gathered from the pixels (a token's own pixels: one, or a patch's ``s²``) and
        from position tables computed here, once, outside the ``torch.while_loop`` body that calls it."""
        s, w, width = self.spatial_downsample, index_shape[1], x.shape[-1]
        pixels = x.flatten(2)  # [B, C, H·W]
        offsets = [dh * width + dw for dh in range(s) for dw in range(s)] if self.prep_type == "patches" else [0]
        points = self._position_rows(x, index_shape, x.shape[2:])

        def rows(index: Tensor) -> Tensor:
            r = torch.div(index, w, rounding_mode="floor")
            first = r * (s * width) + (index - r * w) * s  # the token's first pixel: row r·s, column c·s
            parts = [pixels.index_select(2, first + o).transpose(1, 2) for o in offsets]  # [B, n, C] each
            y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # patches: channels (dh, dw, c)
            return self._token_rows(y, index, points)

        return rows

    def _gather_video(self, x: Tensor, index_shape: tuple[int, int, int]) -> Callable[[Tensor], Tensor]:
        """:meth:`_gather` for a video ``[B, T, C, H, W]`` whose frames stay token frames (``temporal_downsample``
        1): flat token positions ``index`` (int64 ``[n]``, row-major over ``(T, h, w)``) → ``[B, n, num_channels]``,
        each token's pixels gathered from its own frame, positions from ``(T, h, w)`` tables computed here, once."""
        s, (h, w), (c, height, width) = self.spatial_downsample, index_shape[1:], x.shape[2:]
        pixels = x.reshape(x.shape[0], -1)  # [B, T·C·H·W] (a view of a contiguous video)
        # a token's values after its first pixel's: each patch offset's channels, (dh, dw, c) as space_to_depth
        # orders them; built by operators (symbolic sizes), outside the loop body that gathers with them
        span = s if self.prep_type == "patches" else 1
        offsets = (torch.arange(span, device=x.device)[:, None] * width + torch.arange(span, device=x.device)).flatten()
        channels = (offsets[:, None] + torch.arange(c, device=x.device) * (height * width)).flatten()  # [s²·C]
        points = self._position_rows(x, index_shape, (x.shape[1], height, width))

        def rows(index: Tensor) -> Tensor:
            t = torch.div(index, h * w, rounding_mode="floor")
            rest = index - t * (h * w)
            r = torch.div(rest, w, rounding_mode="floor")
            first = t * (c * height * width) + r * (s * width) + (rest - r * w) * s  # frame t, row r·s, column c·s
            # one gather of every value, then [B, n, s²·C] (advanced indexing, pixels[:, idx], became an ONNX
            # GatherND on the transposed video: a copy of the whole input per chunk)
            y = pixels.index_select(1, (first[:, None] + channels).flatten()).unflatten(1, (index.shape[0], -1))
            return self._token_rows(y, index, points)

        return rows

    def _position_rows(self, x: Tensor, index_shape: tuple[int, ...], pixels: tuple[int, ...]) -> Callable[[Tensor], Tensor] | None:
        """The position encoding's rows by flat token position (``grid_gather``), or ``None`` without one. Token
        counts of a symbolic size that are derived from the pixels' (``⌈H / s⌉``) index tables as long as the
        pixel axes ``pixels``: a table of exactly ``⌈H / s⌉`` rows would make ``torch.export`` refuse images one
        token tall (a guard ``⌈H / s⌉ ≠ 1``)."""
        enc = self.position_encoding
        if enc is None:
            return None
        derived = self.spatial_downsample > 1 and any(isinstance(n, torch.SymInt) for n in index_shape)
        return enc.grid_gather(index_shape, device=x.device, dtype=x.dtype, lengths=pixels if derived else None)

    def _token_rows(self, y: Tensor, index: Tensor, points: Callable[[Tensor], Tensor] | None) -> Tensor:
        """The tokens at ``index`` from their gathered pixels ``y [B, n, s²·C]``: the 1×1 conv or patch ``Linear``,
        then the positions ``points(index)`` concatenated or added."""
        if self.prep_type == "conv1x1":  # the 1×1 conv of those pixels
            y = F.linear(y, self.stem.weight.flatten(1), self.stem.bias)
        elif self.patches_linear is not None:
            y = self.patches_linear(y)
        if points is None:
            return y
        feats = points(index).to(y.dtype)  # [n, Cp]
        if self.concat_or_add_pos == "add":
            return y + feats
        return torch.cat((y, feats.expand(y.shape[0], -1, -1)), dim=-1)
