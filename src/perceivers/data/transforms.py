"""Batched image augmentation and normalisation with plain torch ops (no torchvision).

Every function takes and returns a batch of **channels-last** images ``[B, H, W, C]`` — the layout the
Perceivers of this library take — as floating-point tensors on any device, so augmentation runs after
the batch reached the accelerator. Random draws are per sample and come from ``generator`` (default: the
global torch RNG of the batch's device).

Geometric transforms share one resampling step: :func:`random_affine` composes flip, zoom, rotation,
translation and shear into one ``affine_grid`` + ``grid_sample`` per batch; :func:`random_resized_crop`
does the Inception-style crop the same way. :class:`RandAugment` is the 16-op RandAugment of DeepMind's
Perceiver IO ImageNet recipe (TensorFlow semantics on the uint8 grid, nearest-neighbour geometry).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..validation import data_dependent_checks

__all__ = [
    "RANDAUGMENT_OPS",
    "ImageAugment",
    "Normalize",
    "RandAugment",
    "channel_stats",
    "mix_batch",
    "random_affine",
    "random_resized_crop",
    "resize",
    "sample_crop_boxes",
    "to_float",
]


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, H, W, C], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, H, W, C] (channels last), got {tuple(images.shape)}")


def _check_float_images(images: Tensor, name: str) -> None:
    _check_images(images)
    if not images.is_floating_point():
        raise TypeError(f"{name} takes floating-point images [B, H, W, C] (to_float converts uint8), got dtype "
                        f"{images.dtype}")


def _uniform(n: int, low: float, high: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, device=like.device, generator=generator, dtype=torch.float32) * (high - low) + low


def to_float(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` → float32 ``[0, 1]``; floating-point input is returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.float()


def resize(images: Tensor, size: int | Sequence[int]) -> Tensor:
    """Bilinear (antialiased when shrinking) resize of ``[B, H, W, C]`` to ``size`` (int: square)."""
    _check_images(images)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[1:3]) == size:
        return images
    x = rearrange(to_float(images), "b h w c -> b c h w")
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return rearrange(x, "b c h w -> b h w c")


def _sample(
    images: Tensor, theta: Tensor, size: Sequence[int], fill: Tensor | float, mode: str = "bilinear"
) -> Tensor:
    """Resample ``[B, H, W, C]`` through affine maps ``theta [B, 2, 3]`` (output → input, normalised coords)."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {mode!r}")
    x = rearrange(images, "b h w c -> b c h w")
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    # grid_sample pads with zeros: shift so that the padding value becomes `fill`.
    out = F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill
    return rearrange(out, "b c h w -> b h w c")


def random_affine(
    images: Tensor,
    *,
    flip: bool = True,
    zoom: float | tuple[float, float] = 0.0,
    rotate: float = 0.0,
    translate: float = 0.0,
    shear: float = 0.0,
    fill: Tensor | float = 0.0,
    interpolation: str = "bilinear",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random horizontal flip, zoom, rotation, translation and shear in one resampling.

    Args:
        images: ``[B, H, W, C]`` float.
        flip: flip each image left-right with probability 1/2.
        zoom: relative zoom range; ``0.2`` draws factors in ``[0.8, 1.2]`` (>1 = zoom in), a pair gives
            the range directly (Keras ``RandomZoom(0.2)`` ≈ ``0.2``).
        rotate: maximum rotation in degrees, drawn uniformly in ``[-rotate, rotate]``.
        translate: maximum shift as a fraction of the image size, per axis.
        shear: maximum horizontal shear angle in degrees.
        fill: value of pixels coming from outside the image (a scalar or one value per channel).
        interpolation: ``"bilinear"`` or ``"nearest"``. Bilinear resampling blurs very small images (8×8
            digits) noticeably, so that training images no longer look like test images; ``"nearest"``
            with ``translate`` a multiple of ``1 / size`` gives whole-pixel shifts instead.
    """
    _check_float_images(images, "random_affine")
    b = images.shape[0]
    zoom_range = (1.0 - zoom, 1.0 + zoom) if isinstance(zoom, (int, float)) else tuple(zoom)
    if zoom_range[0] <= 0:
        raise ValueError(f"zoom range must stay above 0, got {zoom_range}")
    scale = _uniform(b, *zoom_range, images, generator)
    angle = _uniform(b, -rotate, rotate, images, generator) * (math.pi / 180)
    skew = torch.tan(_uniform(b, -shear, shear, images, generator) * (math.pi / 180))
    shift = _uniform(2 * b, -2 * translate, 2 * translate, images, generator).reshape(b, 2)  # normalised units
    sign = torch.ones(b, device=images.device)
    if flip:
        sign = torch.where(torch.rand(b, device=images.device, generator=generator) < 0.5, -sign, sign)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = cos * sign
    theta[:, 0, 1] = -sin + skew * cos
    theta[:, 1, 0] = sin * sign
    theta[:, 1, 1] = cos + skew * sin
    theta[:, :, 2] = shift
    return _sample(images, theta, images.shape[1:3], fill, interpolation)


def _lrint(v: Tensor) -> Tensor:
    """C's lrintf: round half to even (torch.round does the same), as int64."""
    return torch.round(v).long()


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    *,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    min_object_covered: float = 0.1,
    max_attempts: int = 10,
    crop_padding: int = 32,
    output_size: int = 224,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop boxes ``[batch, 4]`` as ``(top, left, crop_height, crop_width)`` in pixels, drawn as DeepMind's
    ImageNet pipeline draws them: ``tf.image.sample_distorted_bounding_box`` with the whole image as the
    object box, falling back to the centre crop when every attempt fails.

    Per attempt: an aspect ratio (width / height) uniform in ``aspect_ratio_range`` (not log-uniform); a
    crop height uniform over the whole numbers between the heights that give ``area_range`` at that ratio
    (so the area share is not uniform: for 640×427 its median is 0.33, mean 0.35); width =
    ``round(height · ratio)``; accepted when the area share stays in ``area_range``, the crop fits and it
    covers at least ``min_object_covered`` of the image (so shares below 0.1 are redrawn); a uniform
    offset. After ``max_attempts`` failures: the centre crop of side ``int(output_size / (output_size +
    crop_padding) · min(H, W))`` (the evaluation crop).
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    side = int(np.float32(output_size / (output_size + crop_padding)) * np.float32(min(height, width)))
    centre = np.array([(height - side + 1) // 2, (width - side + 1) // 2, side, side])
    if max_attempts < 1:
        return torch.from_numpy(np.tile(centre, (batch, 1))).to(dev)
    # The draws, in the order of an attempt-by-attempt loop (per attempt: the ratio, float32; the height, top
    # and left, float64; each [batch]), so that a generator gives the same boxes as that loop would. On the
    # CPU one call of 3 x batch float64 consumes the generator as three calls of batch do.
    unit_ratio, unit_rest = [], []
    for _ in range(max_attempts):
        unit_ratio.append(torch.rand(batch, device=dev, generator=generator))
        if dev.type == "cpu":
            unit_rest.append(torch.rand(3, batch, device=dev, generator=generator, dtype=torch.float64))
        else:  # other generators (CUDA's Philox) advance per call
            unit_rest.append(torch.stack([torch.rand(batch, device=dev, generator=generator, dtype=torch.float64)
                                          for _ in range(3)]))
    unit_ratio = torch.stack(unit_ratio).cpu().numpy()  # [attempts, batch] float32
    unit_h, unit_top, unit_left = torch.stack(unit_rest).cpu().numpy().transpose(1, 0, 2)  # float64 each

    # Every attempt at once, in numpy (a few dozen tiny torch ops cost ~10x more), with TF's float32
    # arithmetic on the image area and the ratio; integers are int64, float32 casts written out.
    f32 = np.float32
    lo, hi = aspect_ratio_range
    ratio = unit_ratio * f32(hi - lo) + f32(lo)
    min_area = f32(area_range[0]) * f32(width) * f32(height)
    max_area = f32(area_range[1]) * f32(width) * f32(height)

    def times_ratio(n: np.ndarray) -> np.ndarray:  # round(n · ratio), C's lrintf
        return np.rint(n.astype(np.float32) * ratio).astype(np.int64)

    h = np.rint(np.sqrt(min_area / ratio)).astype(np.int64)
    max_h = np.rint(np.sqrt(max_area / ratio)).astype(np.int64)
    too_wide = times_ratio(max_h) > width
    max_h = np.where(too_wide, ((width + 0.5 - 1e-7) / ratio.astype(np.float64)).astype(np.int64), max_h)
    max_h = np.where(too_wide & (times_ratio(max_h) > width), max_h - 1, max_h)
    max_h = np.minimum(max_h, height)
    h = np.minimum(h, max_h)
    h = h + _scaled_below(unit_h, np.maximum(max_h - h + 1, 1))
    w = times_ratio(h)
    grow = (w * h).astype(np.float32) < min_area
    h = np.where(grow, h + 1, h)
    w = np.where(grow, times_ratio(h), w)
    shrink = (w * h).astype(np.float32) > max_area
    h = np.where(shrink, h - 1, h)
    w = np.where(shrink, times_ratio(h), w)
    area = (w * h).astype(np.float32)
    ok = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height) & (w > 0) & (h > 0)
    ok &= area / f32(width * height) >= f32(min_object_covered)
    top = np.where(h < height, _scaled_below(unit_top, np.maximum(height - h, 1)), 0)
    left = np.where(w < width, _scaled_below(unit_left, np.maximum(width - w, 1)), 0)
    boxes = np.stack([top, left, h, w], axis=-1)  # [attempts, batch, 4]
    chosen = boxes[ok.argmax(0), np.arange(batch)]  # the first accepted attempt per sample (the first when none)
    # every attempt failed: the whole image, which DeepMind's pipeline replaces by the centre crop; so does an
    # accepted box that covers the whole image
    whole = ~ok.any(0) | ((chosen[:, 2] == height) & (chosen[:, 3] == width))
    return torch.from_numpy(np.where(whole[:, None], centre, chosen)).to(dev)


def _scaled_below(unit: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Uniform integers in ``[0, n)`` from uniform floats ``unit`` in [0, 1) (int64, ``n >= 1``)."""
    return np.minimum((unit * n).astype(np.int64), n - 1)


def random_resized_crop(
    images: Tensor,
    size: int | Sequence[int] | None = None,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    sampler: str = "uniform",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Inception-style crop: a random area share in ``scale`` and aspect ratio in ``ratio``, resized to
    ``size`` (default: the input size), optionally flipped left-right. Crops stay inside the image.

    Args:
        sampler: ``"uniform"`` — area share uniform in ``scale``, log-uniform ratio, clamped to fit
            (torchvision's RandomResizedCrop without its retries); ``"tf"`` — DeepMind's ImageNet crop,
            see :func:`sample_crop_boxes` (``min_object_covered`` 0.1, 10 attempts, centre-crop
            fallback), whole pixels.
    """
    _check_float_images(images, "random_resized_crop")
    b, h, w = images.shape[:3]
    size = (h, w) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    if sampler == "tf":
        box = sample_crop_boxes(b, h, w, area_range=tuple(scale), aspect_ratio_range=tuple(ratio),
                                device=images.device, generator=generator).float()
        cw, ch = box[:, 3] / w, box[:, 2] / h  # half extents in normalised units ([-1, 1] spans the image)
        cx = (2 * box[:, 1] + box[:, 3]) / w - 1
        cy = (2 * box[:, 0] + box[:, 2]) / h - 1
    elif sampler == "uniform":
        area = _uniform(b, *scale, images, generator)
        log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), images, generator)
        aspect = torch.exp(log_ratio)
        # crop width and height as fractions of the image (clamped to fit); aspect = width / height in pixels
        cw = torch.sqrt(area * aspect * h / w).clamp(max=1.0)
        ch = torch.sqrt(area * w / (aspect * h)).clamp(max=1.0)
        cx = _uniform(b, 0.0, 1.0, images, generator) * (1 - cw) * 2 - (1 - cw)  # centre in [-(1-cw), 1-cw]
        cy = _uniform(b, 0.0, 1.0, images, generator) * (1 - ch) * 2 - (1 - ch)
    else:
        raise ValueError(f"sampler must be 'uniform' or 'tf', got {sampler!r}")
    sign = torch.ones(b, device=images.device)
    if flip:
        sign = torch.where(torch.rand(b, device=images.device, generator=generator) < 0.5, -sign, sign)
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = cw * sign
    theta[:, 1, 1] = ch
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return _sample(images, theta, size, 0.0)


@dataclass
class Normalize:
    """``(x - mean) / std`` per channel over ``[..., C]``; build it from data with :meth:`fit`."""

    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self) -> None:
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need the same length, got {len(self.mean)} and {len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @classmethod
    def fit(cls, images: Tensor | Iterable[Tensor]) -> Normalize:
        """Statistics of a (training) split; see :func:`channel_stats`."""
        mean, std = channel_stats(images)
        return cls(mean.tolist(), std.tolist())

    def __call__(self, images: Tensor) -> Tensor:
        if images.shape[-1] != len(self.mean) and len(self.mean) != 1:
            raise ValueError(f"Normalize has {len(self.mean)} channels, images have {images.shape[-1]}")
        mean = images.new_tensor(self.mean)
        std = images.new_tensor(self.std)
        return (images - mean) / std


def channel_stats(images: Tensor | Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of channels-last images (uint8 are scaled to ``[0, 1]``).

    Accepts one tensor ``[..., C]`` or an iterable of such batches (streamed in float64 sums). NaN or Inf
    values raise ``ValueError`` (they would make every normalised batch NaN).
    """
    batches = [images] if isinstance(images, Tensor) else images
    total = sq = None
    count = 0
    for batch in batches:
        x = to_float(batch).reshape(-1, batch.shape[-1]).double()
        s, q = x.sum(0), (x * x).sum(0)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += x.shape[0]
    if count == 0:
        raise ValueError("channel_stats needs at least one image")
    mean = total / count
    if not bool(torch.isfinite(sq).all()):  # NaN/Inf anywhere reaches the sum of squares
        raise ValueError(f"channel_stats: the images hold NaN or Inf values (per-channel means {mean.tolist()})")
    var = (sq / count - mean * mean).clamp(min=0.0)
    return mean.float(), var.sqrt().clamp(min=1e-6).float()


# ---------------------------------------------------------------------------------------------- RandAugment
#
# Each op works on a batch ``[b, H, W, C]`` of float32 *levels*: whole numbers in [0, 255] that stand for the
# uint8 pixels of the TensorFlow original, so that rounding and clipping happen exactly where a uint8 cast
# happens there. Per-image arguments (signs, cutout centres) are tensors of length b.

RANDAUGMENT_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd",
)
_MAX_LEVEL = 10.0  # magnitudes are on a 0..10 scale
_SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})  # random sign per image
_ENHANCE_OPS = frozenset({"Color", "Contrast", "Brightness", "Sharpness"})
_LUMA = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale
_RANGE_SLACK = 0.01  # float input may stray this far outside [0, 1] (resampling round-off) before it is refused


def _trunc_levels(x: Tensor) -> Tensor:
    """Clip to [0, 255] and drop the fraction: TF's clip_by_value + cast to uint8."""
    return x.clamp(0.0, 255.0).floor()


def _blend(a: Tensor, b: Tensor, factor: float) -> Tensor:
    """``a + factor · (b − a)`` cast back to levels (factor 0 → a, 1 → b, >1 extrapolates)."""
    if factor == 0.0:
        return a.expand_as(b).clone()
    if factor == 1.0:
        return b.clone()
    return _trunc_levels(a + factor * (b - a))


def _grayscale(x: Tensor) -> Tensor:
    """Luma levels ``[b, H, W, 1]`` as tf.image.rgb_to_grayscale computes them on uint8 (1 channel: itself)."""
    if x.shape[-1] == 1:
        return x
    flt = x * torch.tensor(1.0 / 255.0, dtype=torch.float32)  # convert_image_dtype uint8 -> float32
    gray = (flt * x.new_tensor(_LUMA)).sum(-1, keepdim=True)
    return (gray * 255.5).floor()  # convert_image_dtype float32 -> uint8: scale by 255 + 0.5, truncate


def _per_channel_lookup(x: Tensor, tables: Tensor) -> Tensor:
    """Levels ``[b, H, W, C]`` mapped through per-image, per-channel tables ``[b, 256, C]``: a gather along the
    level axis, so no per-channel constant is broadcast over the pixels (slow on the CPU with C = 3)."""
    b, h, w, c = x.shape
    return tables.gather(1, x.long().reshape(b, h * w, c)).reshape(b, h, w, c)


def _autocontrast(x: Tensor) -> Tensor:
    b, h, w, c = x.shape
    lo, hi = torch.aminmax(x.reshape(b, h * w, c), dim=1, keepdim=True)  # [b, 1, C]
    scale = x.new_tensor(255.0) / (hi - lo).clamp(min=1.0)  # a true division (255.0 / t multiplies by 1/t)
    # each level's output, computed as it would be per pixel: level · scale − lo · scale, clipped and truncated
    levels = torch.arange(256, device=x.device, dtype=x.dtype).reshape(1, 256, 1)
    tables = torch.where(hi > lo, _trunc_levels(levels * scale - lo * scale), levels)  # [b, 256, C]
    return _per_channel_lookup(x, tables)


def _equalize(x: Tensor) -> Tensor:
    b, h, w, c = x.shape
    levels = x.long().reshape(b, h * w, c)
    hist = torch.zeros(b, 256, c, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones((), dtype=torch.long, device=x.device).expand_as(levels))  # [b, 256, C]
    # step: pixels outside the brightest occupied bin, per 255 output levels
    brightest = 255 - (hist.flip(1) > 0).int().argmax(1, keepdim=True)  # [b, 1, C]
    last = hist.gather(1, brightest)
    step = (h * w - last) // 255
    before = hist.cumsum(1) - hist  # pixels strictly darker than each level
    lut = ((before + step // 2) // step.clamp(min=1)).clamp(max=255)
    tables = torch.where(step > 0, lut, torch.arange(256, device=x.device).reshape(1, 256, 1)).to(x.dtype)
    return tables.gather(1, levels).reshape(b, h, w, c)


def _posterize(x: Tensor, bits: int) -> Tensor:
    # TF's bitwise shifts clamp the shift to 7 for uint8, so 0 bits still keeps the top bit
    step = 2.0 ** min(8 - bits, 7)
    return (x / step).floor() * step


def _solarize(x: Tensor, threshold: int) -> Tensor:
    # TF compares uint8 pixels with the threshold cast to uint8, so 256 (magnitude 10) wraps to 0: every
    # level is inverted, as Invert does (not "nothing is inverted")
    return torch.where(x < int(threshold) % 256, x, 255.0 - x)


def _solarize_add(x: Tensor, addition: int, threshold: int = 128) -> Tensor:
    return torch.where(x < threshold, (x + addition).clamp(0.0, 255.0), x)


def _contrast_degenerate(x: Tensor, mean: str) -> Tensor:
    """The constant grey that Contrast blends away from, ``[b, 1, 1, 1]``."""
    if mean == "tf":
        # the TF op takes sum(histogram) / 256 = (number of pixels) / 256, whatever the content
        level = math.floor(min(x.shape[1] * x.shape[2] / 256.0, 255.0))
        return x.new_full((x.shape[0], 1, 1, 1), float(level))
    return (_grayscale(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()  # PIL: int(mean + 0.5)


# TF's SMOOTH kernel: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 in float32
_SMOOTH_EDGE = float(np.float32(1.0) / np.float32(13.0))
_SMOOTH_CENTRE = float(np.float32(5.0) / np.float32(13.0))


def _sharpen_degenerate(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3×3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13), truncated, inside; the image on the border.

    Bit for bit TF's CPU ``depthwise_conv2d`` (the original pins this op to the CPU): the nine float32 taps
    are accumulated in row-major order with fused multiply-adds, each step rounded once to float32. A
    level times a float32 weight plus a float32 sum is exact in float64, so computing each step in float64
    and rounding to float32 reproduces the fused step exactly. Devices without float64 (MPS) take the exact
    integer sum / 13 instead, one level off TF on about 0.7 % of a photograph's pixels (flat areas: TF
    smooths 53 of the 256 levels to one level lower).
    """
    b, h, w = x.shape[:3]
    if h < 3 or w < 3:
        return x
    if x.device.type == "mps":
        kernel = x.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]).reshape(1, 1, 3, 3)
        total = F.conv2d(rearrange(x, "b h w c -> (b c) 1 h w"), kernel)  # whole numbers <= 13 * 255: exact
        smooth = rearrange((total / 13.0).floor(), "(b c) 1 h w -> b h w c", b=b)
    else:
        acc = None
        for r in range(3):
            for c in range(3):
                weight = _SMOOTH_CENTRE if (r, c) == (1, 1) else _SMOOTH_EDGE
                tap = x[:, r : h - 2 + r, c : w - 2 + c].double() * weight
                acc = (tap if acc is None else tap + acc.double()).float()  # one fused multiply-add, rounded once
        smooth = acc.clamp(0.0, 255.0).floor()
    out = x.clone()
    out[:, 1:-1, 1:-1] = smooth
    return out


def _round_half_away(v: Tensor) -> Tensor:
    """std::round, which TF's nearest-neighbour sampling uses (torch.round rounds half to even), as int32;
    values beyond ±2^24 (outside any image) are clipped first."""
    v = v.clamp(-(2.0**24), 2.0**24)
    return (v + torch.copysign(torch.tensor(0.5, device=v.device), v)).int()  # the cast truncates towards 0


def _warp_nearest(x: Tensor, theta: Tensor, fill: float) -> Tensor:
    """Nearest-neighbour warp of ``[b, H, W, C]``: output pixel (col, row) reads the input at
    ``theta[:, :, :2] @ (col, row) + theta[:, :, 2]`` (``theta [b, 2, 3]``, pixel-index coordinates, the
    inverse map as in tf.raw_ops.ImageProjectiveTransform); pixels from outside get ``fill``."""
    b, h, w, c = x.shape
    rows = torch.arange(h, device=x.device, dtype=torch.float32).reshape(1, h, 1)
    cols = torch.arange(w, device=x.device, dtype=torch.float32).reshape(1, 1, w)
    t = theta.to(torch.float32).reshape(b, 6, 1, 1).unbind(1)
    src_x = _round_half_away(t[0] * cols + t[1] * rows + t[2])  # [b, H, W] int32
    src_y = _round_half_away(t[3] * cols + t[4] * rows + t[5])
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    # one row per pixel, images one after another, each followed by a fill pixel that outside pixels read
    stride = h * w + 1
    index = torch.where(inside, src_y.long() * w + src_x if b * stride >= 2**31 else src_y * w + src_x, h * w)
    if b > 1:
        index = index + torch.arange(b, device=x.device, dtype=index.dtype).reshape(b, 1, 1) * stride
    pixels = torch.cat([x.reshape(b, h * w, c), x.new_full((b, 1, c), fill)], dim=1).reshape(b * stride, c)
    return pixels.index_select(0, index.reshape(-1)).reshape(b, h, w, c)


def _affine_theta(op: str, arg: Tensor, h: int, w: int) -> Tensor:
    """Inverse maps ``[b, 2, 3]`` of the geometric ops for signed arguments ``arg [b]``."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if op == "Rotate":  # tfa.image.rotate: counter-clockwise by arg degrees about the image centre
        rad = arg * (math.pi / 180.0)
        cos, sin = torch.cos(rad), torch.sin(rad)
        x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
        y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
        rows = (cos, -sin, x_off, sin, cos, y_off)
    elif op == "ShearX":  # about the top-left pixel, as the TF op (PIL shears about the top-left corner)
        rows = (one, arg, zero, zero, one, zero)
    elif op == "ShearY":
        rows = (one, zero, zero, arg, one, zero)
    elif op == "TranslateX":  # output(x) = input(x + arg)
        rows = (one, zero, arg, zero, one, zero)
    else:  # TranslateY
        rows = (one, zero, zero, zero, one, arg)
    return torch.stack(rows, dim=1).reshape(-1, 2, 3)


def _cutout(x: Tensor, pad: int, centers: Tensor, fill: float) -> Tensor:
    """Grey square ``[cy − pad, cy + pad) × [cx − pad, cx + pad)`` (clipped) per image; ``centers [b, 2]``."""
    if x.device.type == "cpu":  # slices: ~10x faster than a masked select over every pixel
        out = x.clone()
        for image, (cy, cx) in zip(out, centers.tolist()):
            image[max(cy - pad, 0) : max(cy + pad, 0), max(cx - pad, 0) : max(cx + pad, 0)] = fill
        return out
    h, w = x.shape[1:3]
    cy, cx = centers[:, 0].reshape(-1, 1, 1), centers[:, 1].reshape(-1, 1, 1)
    rows = torch.arange(h, device=x.device).reshape(1, h, 1)
    cols = torch.arange(w, device=x.device).reshape(1, 1, w)
    box = (rows >= cy - pad) & (rows < cy + pad) & (cols >= cx - pad) & (cols < cx + pad)
    return torch.where(box.unsqueeze(-1), x.new_tensor(fill), x)


@dataclass
class RandAugment:
    """RandAugment (Cubuk et al. 2019) as DeepMind's Perceiver IO ImageNet training runs it.

    The op list, magnitude-to-argument mappings and constants follow ``distort_image_with_randaugment`` of
    the TensorFlow TPU/EfficientNet code that ``perceiver/train/autoaugment.py`` carries: every one of
    ``num_layers`` layers draws one of the 16 :data:`RANDAUGMENT_OPS` uniformly, **per image**, and always
    applies it (the TF code draws a probability per op but never passes it on) at the shared ``magnitude``:

    ===========================  ===========================================================================
    Rotate                       ± m/10 · 30 degrees about the centre (random sign)
    ShearX / ShearY              ± m/10 · 0.3 (random sign), about the top-left pixel
    TranslateX / TranslateY      ± m/10 · ``translate_const`` pixels (random sign)
    Posterize                    keep int(m/10 · 4) bits (TF's mapping: *more* bits at higher m)
    Solarize                     invert levels ≥ int(m/10 · 256) (TF casts 256, at m = 10, to uint8 0: all)
    SolarizeAdd                  add int(m/10 · 110) to levels < 128
    Color/Contrast/Brightness/   blend with a degenerate image by factor m/10 · 1.8 + 0.1 (no sign: at m = 5
    Sharpness                    the factor is exactly 1, so DeepMind's recipe leaves these four as no-ops)
    Cutout                       grey square of side 2 · int(m/10 · ``cutout_const``) at a uniform centre
    AutoContrast, Equalize,      no argument
    Invert
    ===========================  ===========================================================================

    Geometric ops resample nearest-neighbour; uncovered pixels and Cutout take ``fill``. All ops run on the
    uint8 grid as the original does: float input (values in [0, 1]; NaN or values more than 0.01 outside
    raise ``ValueError``) is quantised to 255 levels first. Every op equals TensorFlow's output pixel for
    pixel at the same argument, sign and Cutout centre (``tests/data/test_randaugment_tf_parity.py``).

    Args:
        num_layers: ops applied one after another to each image (N; DeepMind ImageNet: 4).
        magnitude: shared strength on the 0..10 scale (M; DeepMind ImageNet: 5).
        translate_const: TranslateX/Y shift in pixels at magnitude 10 (TF: 100; DeepMind applies it to
            the random crop before resizing to 224).
        cutout_const: Cutout half side in pixels at magnitude 10 (TF: 40).
        fill: grey level 0..255 of uncovered pixels and of Cutout (TF: 128).
        contrast_mean: grey that Contrast blends from: ``"tf"`` reproduces the TF op, which takes the mean
            of the grey-level *histogram* (pixel count / 256, e.g. 196 for 224×224, whatever the image);
            ``"pil"`` uses the image's mean grey level as PIL's ``ImageEnhance.Contrast`` does.
    """

    num_layers: int = 2
    magnitude: float = 5.0
    translate_const: float = 100.0
    cutout_const: float = 40.0
    fill: float = 128.0
    contrast_mean: str = "tf"

    def __post_init__(self) -> None:
        layers, magnitude = self.num_layers, self.magnitude
        if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 0:
            raise ValueError(f"num_layers must be an integer >= 0, got {layers!r}")
        if isinstance(magnitude, bool) or not isinstance(magnitude, numbers.Real) or not 0 <= magnitude <= _MAX_LEVEL:
            raise ValueError(f"magnitude must be a number in [0, {_MAX_LEVEL:g}], got {magnitude!r}")
        if self.translate_const < 0 or self.cutout_const < 0:
            raise ValueError(
                f"translate_const and cutout_const must be >= 0, got {self.translate_const}, {self.cutout_const}"
            )
        if not 0 <= self.fill <= 255:
            raise ValueError(f"fill must be a level in [0, 255], got {self.fill}")
        if self.contrast_mean not in ("tf", "pil"):
            raise ValueError(f"contrast_mean must be 'tf' or 'pil', got {self.contrast_mean!r}")

    def argument(self, op: str) -> float:
        """The op's argument at this magnitude, before any random sign (``0`` for ops without one)."""
        level = float(self.magnitude) / _MAX_LEVEL
        table = {
            "Rotate": level * 30.0,
            "ShearX": level * 0.3,
            "ShearY": level * 0.3,
            "TranslateX": level * float(self.translate_const),
            "TranslateY": level * float(self.translate_const),
            "Posterize": int(level * 4),
            "Solarize": int(level * 256),
            "SolarizeAdd": int(level * 110),
            "Cutout": int(level * self.cutout_const),
        }
        if op in _ENHANCE_OPS:
            return level * 1.8 + 0.1
        if op in table:
            return table[op]
        if op in RANDAUGMENT_OPS:
            return 0
        raise ValueError(f"unknown RandAugment op {op!r}; expected one of {RANDAUGMENT_OPS}")

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``[B, H, W, C]`` (C = 1 or 3): uint8, or float in ``[0, 1]``; returns the same dtype."""
        x = self._to_levels(images)
        b, h, w = x.shape[:3]
        dev = x.device
        for _ in range(self.num_layers):
            choice = torch.randint(len(RANDAUGMENT_OPS), (b,), device=dev, generator=generator)
            negate = torch.rand(b, device=dev, generator=generator) < 0.5
            centers = torch.stack([torch.randint(h, (b,), device=dev, generator=generator),
                                   torch.randint(w, (b,), device=dev, generator=generator)], dim=1)
            if b == 1:  # one image (the per-image pipeline): no selection copies
                x = self._apply(RANDAUGMENT_OPS[int(choice)], x, negate, centers)
                continue
            out = x.clone()
            for index, op in enumerate(RANDAUGMENT_OPS):
                sel = (choice == index).nonzero().flatten()
                if sel.numel():
                    out[sel] = self._apply(op, x[sel], negate[sel], centers[sel])
            x = out
        return self._from_levels(x, images.dtype)

    def apply_op(
        self,
        images: Tensor,
        op: str,
        *,
        negate: bool | Tensor | None = None,
        centers: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Apply one named op to every image of ``[B, H, W, C]`` at this magnitude (for tests and previews).

        Args:
            negate: flip the sign of the signed ops: a bool, a bool tensor ``[B]`` or None (random, 1/2).
            centers: Cutout centres ``[B, 2]`` as (row, column); None draws them uniformly.
        """
        self.argument(op)  # validates the name
        x = self._to_levels(images)
        b, h, w = x.shape[:3]
        if negate is None:
            negate = torch.rand(b, device=x.device, generator=generator) < 0.5
        negate = torch.as_tensor(negate, device=x.device).expand(b)
        if centers is None:
            centers = torch.stack([torch.randint(h, (b,), device=x.device, generator=generator),
                                   torch.randint(w, (b,), device=x.device, generator=generator)], dim=1)
        return self._from_levels(self._apply(op, x, negate, centers.to(x.device)), images.dtype)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _to_levels(images: Tensor) -> Tensor:
        _check_images(images)
        if images.shape[-1] not in (1, 3):
            raise ValueError(f"RandAugment needs 1 or 3 channels (grey or RGB), got {images.shape[-1]}")
        if images.dtype == torch.uint8:
            return images.float()
        if not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")
        x = images.float()
        if data_dependent_checks() and x.device.type != "meta" and x.numel():
            low, high = torch.aminmax(x)
            # NaN fails both tests; 0..255 floats or standardised values would be clamped to a white/grey picture
            if not (low >= -_RANGE_SLACK and high <= 1 + _RANGE_SLACK):
                raise ValueError(f"float images must hold values in [0, 1] (or pass uint8), got values in "
                                 f"[{float(low):g}, {float(high):g}]")
        return (x.clamp(0.0, 1.0) * 255.0).round()

    @staticmethod
    def _from_levels(x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(torch.uint8) if dtype == torch.uint8 else (x / 255.0).to(dtype)

    def _apply(self, op: str, x: Tensor, negate: Tensor, centers: Tensor) -> Tensor:
        arg = self.argument(op)
        if op in _SIGNED_OPS:
            signed = torch.where(negate, -arg, arg).to(torch.float32)
            return _warp_nearest(x, _affine_theta(op, signed, x.shape[1], x.shape[2]), self.fill)
        if op == "AutoContrast":
            return _autocontrast(x)
        if op == "Equalize":
            return _equalize(x)
        if op == "Invert":
            return 255.0 - x
        if op == "Posterize":
            return _posterize(x, arg)
        if op == "Solarize":
            return _solarize(x, arg)
        if op == "SolarizeAdd":
            return _solarize_add(x, arg)
        if op == "Cutout":
            return _cutout(x, arg, centers, self.fill)
        if op in _ENHANCE_OPS and arg == 1.0:  # blending by 1 keeps the image: no degenerate image needed
            return x
        if op == "Color":
            return _blend(_grayscale(x), x, arg)
        if op == "Contrast":
            return _blend(_contrast_degenerate(x, self.contrast_mean), x, arg)
        if op == "Brightness":
            return _blend(torch.zeros_like(x), x, arg)
        return _blend(_sharpen_degenerate(x), x, arg)  # Sharpness


@dataclass
class ImageAugment:
    """Training-time augmentation of a batch ``[B, H, W, C]`` (float in ``[0, 1]``, before normalisation).

    Args:
        flip: random left-right flips.
        zoom: random zoom range (see :func:`random_affine`); 0 disables.
        rotate: random rotation in degrees; 0 disables.
        translate: random shift as a fraction of the size; 0 disables.
        crop_scale: if set, an Inception-style random resized crop with this area range replaces zoom.
        crop_sampler: how that crop is drawn, ``"uniform"`` or ``"tf"`` (DeepMind's ImageNet crop), see
            :func:`random_resized_crop`.
        randaugment_layers, randaugment_magnitude: :class:`RandAugment` ops per image and their shared
            magnitude on the 0..10 scale (0 layers disables; DeepMind ImageNet: 4 and 5).
        interpolation: resampling of flips/zoom/rotation/shifts, ``"bilinear"`` or ``"nearest"``.
    """

    flip: bool = True
    zoom: float = 0.0
    rotate: float = 0.0
    translate: float = 0.0
    crop_scale: tuple[float, float] | None = None
    crop_sampler: str = "uniform"
    randaugment_layers: int = 0
    randaugment_magnitude: float = 5.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop_sampler not in ("uniform", "tf"):
            raise ValueError(f"crop_sampler must be 'uniform' or 'tf', got {self.crop_sampler!r}")
        if self.randaugment_layers:
            RandAugment(self.randaugment_layers, self.randaugment_magnitude)  # reject bad values early

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, fill: Tensor | float = 0.0
    ) -> Tensor:
        """Augment ``[B, H, W, C]``; ``fill`` colours pixels shifted in from outside the image."""
        images = to_float(images)
        if self.crop_scale is not None:
            images = random_resized_crop(images, scale=tuple(self.crop_scale), flip=self.flip,
                                         sampler=self.crop_sampler, generator=generator)
            if self.rotate or self.translate:
                images = random_affine(images, flip=False, rotate=self.rotate, translate=self.translate,
                                       fill=fill, interpolation=self.interpolation, generator=generator)
        elif self.flip or self.zoom or self.rotate or self.translate:
            images = random_affine(images, flip=self.flip, zoom=self.zoom, rotate=self.rotate,
                                   translate=self.translate, fill=fill, interpolation=self.interpolation,
                                   generator=generator)
        if self.randaugment_layers:
            images = RandAugment(self.randaugment_layers, self.randaugment_magnitude)(images, generator)
        return images


def _beta(alpha: float, n: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) reproducible through ``generator`` (torch has no seeded Beta sampler)."""
    seed = int(torch.randint(2**62, (), device=like.device, generator=generator).item())
    draws = np.random.default_rng(seed).beta(alpha, alpha, size=n)
    return torch.as_tensor(draws, dtype=torch.float32, device=like.device)


def mix_batch(
    images: Tensor,
    targets: Tensor,
    num_classes: int,
    *,
    mixup_alpha: float = 0.2,
    cutmix_alpha: float = 1.0,
    cutmix_prob: float = 0.5,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MixUp and CutMix with soft targets, per sample as in DeepMind's Perceiver IO ImageNet pipeline.

    Sample ``i`` is mixed with sample ``B - 1 - i`` (the batch flipped). A share ``cutmix_prob`` of every
    batch (DeepMind: half; the count is rounded at random when it is not whole) gets CutMix, the rest
    MixUp; an alpha of 0 disables that method. Every sample draws its own ``λ ~ Beta(α, α)``: MixUp blends
    ``λ · own + (1 − λ) · partner``; CutMix pastes the partner into a box of side ``√(1 − λ)`` times the
    image's, centred uniformly and clipped at the border, and ``λ`` becomes the area share actually kept.
    Targets mix with the same ``λ`` (label smoothing commutes with the mixing).

    Args:
        images: floating-point ``[B, H, W, C]``.
        targets: integer class ids ``[B]``.

    Returns:
        mixed images ``[B, H, W, C]`` and soft targets ``[B, num_classes]`` (rows sum to 1).
    """
    _check_float_images(images, "mix_batch")  # in uint8, λ and the soft targets would be cut to 0 or 1
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer class ids [B], got {getattr(targets, 'dtype', type(targets).__name__)}")
    if tuple(targets.shape) != tuple(images.shape[:1]):
        raise ValueError(f"targets must be [B] = [{images.shape[0]}] class ids, got shape {tuple(targets.shape)}")
    onehot = F.one_hot(targets, num_classes).to(images.dtype)
    if label_smoothing:
        onehot = onehot * (1 - label_smoothing) + label_smoothing / num_classes
    share = 0.0 if cutmix_alpha <= 0 else (1.0 if mixup_alpha <= 0 else cutmix_prob)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, onehot
    b, h, w = images.shape[:3]
    dev = images.device
    n_cut = min(math.floor(share * b + torch.rand((), device=dev, generator=generator).item()), b)
    is_cut = torch.arange(b, device=dev) >= b - n_cut  # [B]; rows come shuffled, so position is arbitrary
    lam_cut = _beta(cutmix_alpha, b, images, generator) if n_cut else images.new_ones(b)
    lam_mix = _beta(mixup_alpha, b, images, generator) if n_cut < b else images.new_ones(b)
    lam = torch.where(is_cut, lam_cut, lam_mix)
    # CutMix boxes, one per sample: side ratio sqrt(1 - λ), centre uniform, clipped
    side = torch.sqrt(1.0 - lam)
    ch, cw = (side * h).long(), (side * w).long()
    cy = torch.randint(h, (b,), device=dev, generator=generator)
    cx = torch.randint(w, (b,), device=dev, generator=generator)
    y0, y1 = (cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h)
    x0, x1 = (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)
    rows = torch.arange(h, device=dev).reshape(1, h, 1)
    cols = torch.arange(w, device=dev).reshape(1, 1, w)
    box = ((rows >= y0.reshape(-1, 1, 1)) & (rows < y1.reshape(-1, 1, 1))
           & (cols >= x0.reshape(-1, 1, 1)) & (cols < x1.reshape(-1, 1, 1)))  # [B, H, W]
    box = box & is_cut.reshape(-1, 1, 1)
    lam = torch.where(is_cut, 1.0 - ((y1 - y0) * (x1 - x0)).float() / (h * w), lam).to(images.dtype)
    other = images.flip(0)
    blended = images * lam.reshape(-1, 1, 1, 1) + other * (1 - lam.reshape(-1, 1, 1, 1))
    mixed = torch.where(is_cut.reshape(-1, 1, 1, 1), torch.where(box.unsqueeze(-1), other, images), blended)
    return mixed, onehot * lam[:, None] + onehot.flip(0) * (1 - lam[:, None])
