"""Optical flow around the model: frame normalisation, 3×3 patches, tiled inference, colour rendering.

Scaling, as in DeepMind's flow colab: the decoder's final Linear gives a raw value ``o``; the
model divides it by ``rescale_factor = 100`` (that is what the model, and transformers'
``PerceiverForOpticalFlow``, return); the colab then multiplies by ``FLOW_SCALE_FACTOR = 20``
(AutoFlow trained on targets divided by 20), so the flow in pixels is ``o / 100 · 20 = 0.2 · o``.
:func:`tile_flow` does no scaling of its own: it averages whatever ``model_fn`` returns, so
``model_fn`` must already return pixels (see :func:`flow_model_fn`).

Tiling (colab ``compute_grid_indices`` / ``compute_optical_flow``): tiles of 368×496 at strides of
``tile − min_overlap`` (20 px), the last row/column of tiles moved flush with the image border;
each tile's flow is weighted per pixel by ``min(x + 1, w − x, y + 1, h − y)`` in tile coordinates and
the weighted sum is divided by the summed weights. Sintel's 436×1024 gives 2×3 = 6 tiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "FLOW_SCALE_FACTOR",
    "TRAIN_SIZE",
    "flow_model_fn",
    "flow_to_color",
    "normalize_frames",
    "save_flow_png",
    "tile_flow",
    "tile_origins",
    "tile_weights",
]

TRAIN_SIZE = (368, 496)
FLOW_SCALE_FACTOR = 20.0

FlowFn = Callable[[Tensor], Tensor]


def normalize_frames(frames: Tensor | np.ndarray) -> Tensor:
    """Pixel values in [0, 255] (any shape, channels last) → float32 ``x / 255 · 2 − 1`` in [−1, 1]."""
    x = frames.float() if isinstance(frames, Tensor) else torch.from_numpy(np.array(frames, dtype=np.float32))
    return x / 255.0 * 2.0 - 1.0


def _as_float(frames: Tensor | np.ndarray) -> Tensor:
    """Already normalised frames (floating point, values in [−1, 1]) as a tensor."""
    x = frames if isinstance(frames, Tensor) else torch.from_numpy(np.asarray(frames))
    if not x.is_floating_point():  # integer frames hold pixels in [0, 255], which the model would take as is
        raise TypeError(f"normalized=True takes floating-point frames in [-1, 1], got dtype {x.dtype} (pass "
                        "normalized=False for pixel values in [0, 255])")
    return x


def tile_origins(
    image_size: tuple[int, int], tile_size: tuple[int, int] = TRAIN_SIZE, min_overlap: int = 20
) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the tiles covering an image, row-major.

    An axis shorter than the tile gets a single tile at 0 (:func:`tile_flow` pads such images).
    """
    if not 0 <= min_overlap < min(tile_size):  # a negative overlap leaves gaps between the tiles
        raise ValueError(f"min_overlap={min_overlap} must be in [0, {min(tile_size)}): at least 0 and smaller than "
                         f"the tile size {tile_size}")
    starts = []
    for length, tile in zip(image_size, tile_size):
        if length <= tile:
            starts.append([0])
            continue
        axis = list(range(0, length, tile - min_overlap))
        axis[-1] = length - tile  # last tile flush with the border
        # the colab's rule can leave a middle tile running past the border (e.g. 13 px, tile 8, stride 6:
        # 0, 6, 5); such tiles are dropped. Where the colab's tiles all fit, the list is exactly its list.
        starts.append([s for s in axis if s + tile <= length])
    return [(y, x) for y in starts[0] for x in starts[1]]


def tile_weights(height: int, width: int) -> Tensor:
    """Per-pixel blending weight of a tile: ``min(x + 1, w − x, y + 1, h − y)`` → ``[h, w]`` float32."""
    y = torch.arange(height, dtype=torch.float32)[:, None]
    x = torch.arange(width, dtype=torch.float32)[None, :]
    wy = torch.minimum(y + 1, height - y)
    wx = torch.minimum(x + 1, width - x)
    return torch.minimum(wy, wx)


def tile_flow(
    model_fn: FlowFn,
    frame1: Tensor | np.ndarray,
    frame2: Tensor | np.ndarray,
    *,
    tile_size: tuple[int, int] = TRAIN_SIZE,
    min_overlap: int = 20,
    tiles_per_batch: int = 1,
    normalized: bool = False,
) -> Tensor:
    """Flow from ``frame1`` to ``frame2`` for images of any size, by blending overlapping tiles.

    Args:
        model_fn: ``[N, 2, h, w, 3]`` normalised frame pairs (values in [−1, 1], channels last) →
            flow ``[N, h, w, 2]`` (``(dx, dy)`` in pixels).
        frame1, frame2: ``[H, W, 3]`` or ``[B, H, W, 3]``, pixel values in [0, 255] (uint8 or float).
        tile_size, min_overlap: the tiling (official: 368×496, 20).
        tiles_per_batch: tiles run through ``model_fn`` together (memory vs. speed).
        normalized: the frames are already normalised to [−1, 1] (floats, as ``model_fn`` takes them;
            integer frames raise ``TypeError``); :func:`normalize_frames` is then skipped.

    Returns:
        flow ``[H, W, 2]`` (or ``[B, H, W, 2]``) float32: the weighted average of the tiles' flows.

    Images smaller than a tile (in either axis) are padded at the bottom/right by repeating the edge
    pixels, as the model only runs at the tile size; the flow of the padding is dropped. (The official
    code has no rule for them.)
    """
    prepare = _as_float if normalized else normalize_frames
    f1, f2 = prepare(frame1), prepare(frame2)
    if f1.shape != f2.shape:
        raise ValueError(f"frames must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    single = f1.ndim == 3
    if single:
        f1, f2 = f1[None], f2[None]
    if f1.ndim != 4 or f1.shape[-1] != 3:
        raise ValueError(f"frames must be [H, W, 3] or [B, H, W, 3] (channels last), got {tuple(f1.shape[single:])}")
    if f1.numel() == 0:
        raise ValueError(f"frames are empty: shape {tuple(f1.shape[single:])}")
    if tiles_per_batch < 1:
        raise ValueError(f"tiles_per_batch must be >= 1, got {tiles_per_batch}")
    pair = torch.stack((f1, f2), dim=1)  # [B, 2, H, W, 3]
    b, _, out_h, out_w, _ = pair.shape
    th, tw = tile_size
    if out_h < th or out_w < tw:
        pad = (0, 0, 0, max(tw - out_w, 0), 0, max(th - out_h, 0))
        pair = F.pad(rearrange(pair, "b t h w c -> (b t) c h w"), pad[2:], mode="replicate")
        pair = rearrange(pair, "(b t) c h w -> b t h w c", b=b)
    height, width = pair.shape[2:4]
    origins = tile_origins((height, width), tile_size, min_overlap)
    weights = tile_weights(th, tw)[None, :, :, None]  # [1, th, tw, 1]
    total = torch.zeros(b, height, width, 2)
    count = torch.zeros(1, height, width, 1)
    for start in range(0, len(origins), tiles_per_batch):
        group = origins[start : start + tiles_per_batch]
        crops = torch.cat([pair[:, :, y : y + th, x : x + tw] for y, x in group])  # [len·B, 2, th, tw, 3]
        with torch.no_grad():
            flows = model_fn(crops).float().cpu()
        if flows.shape != (len(group) * b, th, tw, 2):
            raise ValueError(f"model_fn must return [N, {th}, {tw}, 2] flow, got {tuple(flows.shape)}")
        for i, (y, x) in enumerate(group):
            total[:, y : y + th, x : x + tw] += flows[i * b : (i + 1) * b] * weights
            count[:, y : y + th, x : x + tw] += weights
    flow = (total / count)[:, :out_h, :out_w]
    return flow[0] if single else flow


def flow_model_fn(model: torch.nn.Module, *, scale: float = FLOW_SCALE_FACTOR) -> FlowFn:
    """Wrap an optical-flow model as a :func:`tile_flow` ``model_fn``.

    The model is called on frame pairs ``[N, 2, 3, h, w]`` (it makes the 3×3 patches itself, like
    :class:`perceivers.tasks.OpticalFlowModel`). An output with a ``flow`` attribute is taken as pixels
    already (our models apply the ×20); a bare tensor is taken as the decoder's ``o / 100`` (transformers'
    ``logits``) and multiplied by ``scale``. The model's first parameter decides device and dtype.
    """
    param = next(model.parameters())

    def run(frames: Tensor) -> Tensor:
        x = rearrange(frames, "n t h w c -> n t c h w").to(param.device, param.dtype)
        out = model(x)
        if hasattr(out, "flow"):
            return out.flow
        return getattr(out, "logits", out) * scale

    return run


def _colour_wheel() -> np.ndarray:
    """The 55 hues of the Middlebury flow colour wheel, ``[55, 3]`` in [0, 1].

    Six arcs of linear ramps: red→yellow (15), yellow→green (6), green→cyan (4), cyan→blue (11),
    blue→magenta (13), magenta→red (6).
    """
    arcs = [(15, (1, 0, 0), (1, 1, 0)), (6, (1, 1, 0), (0, 1, 0)), (4, (0, 1, 0), (0, 1, 1)),
            (11, (0, 1, 1), (0, 0, 1)), (13, (0, 0, 1), (1, 0, 1)), (6, (1, 0, 1), (1, 0, 0))]
    rows = []
    for steps, start, end in arcs:
        t = np.arange(steps)[:, None] / steps
        rows.append((1 - t) * np.asarray(start, float) + t * np.asarray(end, float))
    return np.concatenate(rows)


def flow_to_color(flow: Tensor | np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """Render flow ``[H, W, 2]`` (``(dx, dy)``) with the standard colour wheel → ``uint8 [H, W, 3]``.

    Hue encodes the direction (right = red, down = blue-ish, left = cyan, up = yellow-green), saturation
    the magnitude relative to ``max_magnitude`` (default: the largest magnitude in the image); zero flow is
    white, magnitudes beyond the maximum are darkened. Non-finite vectors are drawn black.
    """
    f = flow.detach().cpu().numpy() if isinstance(flow, Tensor) else np.asarray(flow)
    if f.ndim != 3 or f.shape[-1] != 2:
        raise ValueError(f"flow must be [H, W, 2], got shape {f.shape}")
    f = f.astype(np.float64)
    bad = ~np.isfinite(f).all(axis=-1)
    f = np.where(bad[..., None], 0.0, f)
    u, v = f[..., 0], f[..., 1]
    magnitude = np.hypot(u, v)
    if max_magnitude is None:
        max_magnitude = float(magnitude.max())
    radius = magnitude / max(max_magnitude, np.finfo(np.float64).eps)

    wheel = _colour_wheel()
    n = len(wheel)
    angle = np.arctan2(-v, -u) / np.pi  # [-1, 1]
    position = (angle + 1) / 2 * (n - 1)
    lo = np.floor(position).astype(np.int64)
    hi = (lo + 1) % n
    frac = (position - lo)[..., None]
    colour = (1 - frac) * wheel[lo] + frac * wheel[hi]
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - radius[..., None] * (1 - colour), colour * 0.75)
    colour[bad] = 0.0
    return np.floor(255 * colour).astype(np.uint8)


def save_flow_png(flow: Tensor | np.ndarray, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write :func:`flow_to_color` of ``flow [H, W, 2]`` as a PNG (needs Pillow)."""
    from PIL import Image

    Image.fromarray(flow_to_color(flow, **kwargs)).save(path, format="PNG")
