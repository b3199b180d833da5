"""Batched image augmentation and normalisation with plain torch ops (no torchvision).

Every function takes and returns a batch of **channels-last** images ``[B, H, W, C]`` — the layout the
Perceivers of this library take — as floating-point tensors on any device, so augmentation runs after
the batch reached the accelerator. Random draws are per sample and come from ``generator`` (default: the
global torch RNG of the batch's device).

Geometric transforms share one resampling step: :func:`random_affine` composes flip, zoom, rotation,
translation and shear into one ``affine_grid`` + ``grid_sample`` per batch; :func:`random_resized_crop`
does the Inception-style crop the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

__all__ = [
    "ImageAugment",
    "Normalize",
    "RandAugmentLite",
    "channel_stats",
    "mix_batch",
    "random_affine",
    "random_resized_crop",
    "resize",
    "to_float",
]


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, H, W, C], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, H, W, C] (channels last), got {tuple(images.shape)}")


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
    _check_images(images)
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


def random_resized_crop(
    images: Tensor,
    size: int | Sequence[int] | None = None,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Inception-style crop: a random area share in ``scale`` and aspect ratio in ``ratio``, resized to
    ``size`` (default: the input size), optionally flipped left-right. Crops stay inside the image."""
    _check_images(images)
    b, h, w = images.shape[:3]
    size = (h, w) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    area = _uniform(b, *scale, images, generator)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), images, generator)
    aspect = torch.exp(log_ratio)
    # crop width and height as fractions of the image (clamped to fit); aspect = width / height in pixels
    cw = torch.sqrt(area * aspect * h / w).clamp(max=1.0)
    ch = torch.sqrt(area * w / (aspect * h)).clamp(max=1.0)
    cx = _uniform(b, 0.0, 1.0, images, generator) * (1 - cw) * 2 - (1 - cw)  # centre in [-(1-cw), 1-cw]
    cy = _uniform(b, 0.0, 1.0, images, generator) * (1 - ch) * 2 - (1 - ch)
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

    Accepts one tensor ``[..., C]`` or an iterable of such batches (streamed in float64 sums).
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
    var = (sq / count - mean * mean).clamp(min=0.0)
    return mean.float(), var.sqrt().clamp(min=1e-6).float()


@dataclass
class RandAugmentLite:
    """A torch-only RandAugment subset: each image gets ``num_layers`` ops drawn from brightness,
    contrast, solarize, posterize, autocontrast, rotate, shear and translate, at magnitude
    ``magnitude / 10`` of each op's range (DeepMind's ImageNet recipe: 4 layers, magnitude 5).

    Works on float images in ``[0, 1]`` (before normalisation).
    """

    num_layers: int = 2
    magnitude: float = 5.0

    OPS = ("brightness", "contrast", "solarize", "posterize", "autocontrast", "rotate", "shear", "translate")

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        _check_images(images)
        m = self.magnitude / 10.0
        for _ in range(self.num_layers):
            choice = torch.randint(len(self.OPS), (images.shape[0],), device=images.device, generator=generator)
            out = images.clone()
            for index, name in enumerate(self.OPS):
                sel = (choice == index).nonzero().flatten()
                if sel.numel():
                    out[sel] = self._apply(name, images[sel], m, generator)
            images = out
        return images

    @staticmethod
    def _apply(name: str, x: Tensor, m: float, generator: torch.Generator | None) -> Tensor:
        b = x.shape[0]
        signs = torch.where(torch.rand(b, device=x.device, generator=generator) < 0.5, -1.0, 1.0)
        if name == "brightness":
            return (x * (1 + 0.9 * m * signs).reshape(b, 1, 1, 1)).clamp(0, 1)
        if name == "contrast":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            return ((x - mean) * (1 + 0.9 * m * signs).reshape(b, 1, 1, 1) + mean).clamp(0, 1)
        if name == "solarize":
            threshold = 1.0 - m
            return torch.where(x >= threshold, 1.0 - x, x)
        if name == "posterize":
            levels = 2 ** max(1, round(8 - 4 * m))
            return torch.floor(x * levels) / levels
        if name == "autocontrast":
            low = x.amin(dim=(1, 2), keepdim=True)
            high = x.amax(dim=(1, 2), keepdim=True)
            return ((x - low) / (high - low).clamp(min=1e-3)).clamp(0, 1)
        if name == "rotate":
            return random_affine(x, flip=False, rotate=30 * m, generator=generator)
        if name == "shear":
            return random_affine(x, flip=False, shear=17 * m, generator=generator)
        return random_affine(x, flip=False, translate=0.45 * m, generator=generator)


@dataclass
class ImageAugment:
    """Training-time augmentation of a batch ``[B, H, W, C]`` (float in ``[0, 1]``, before normalisation).

    Args:
        flip: random left-right flips.
        zoom: random zoom range (see :func:`random_affine`); 0 disables.
        rotate: random rotation in degrees; 0 disables.
        translate: random shift as a fraction of the size; 0 disables.
        crop_scale: if set, an Inception-style random resized crop with this area range replaces zoom.
        randaugment_layers, randaugment_magnitude: RandAugment-lite ops per image (0 disables).
        interpolation: resampling of flips/zoom/rotation/shifts, ``"bilinear"`` or ``"nearest"``.
    """

    flip: bool = True
    zoom: float = 0.0
    rotate: float = 0.0
    translate: float = 0.0
    crop_scale: tuple[float, float] | None = None
    randaugment_layers: int = 0
    randaugment_magnitude: float = 5.0
    interpolation: str = "bilinear"

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, fill: Tensor | float = 0.0
    ) -> Tensor:
        """Augment ``[B, H, W, C]``; ``fill`` colours pixels shifted in from outside the image."""
        images = to_float(images)
        if self.crop_scale is not None:
            images = random_resized_crop(images, scale=tuple(self.crop_scale), flip=self.flip, generator=generator)
            if self.rotate or self.translate:
                images = random_affine(images, flip=False, rotate=self.rotate, translate=self.translate,
                                       fill=fill, interpolation=self.interpolation, generator=generator)
        elif self.flip or self.zoom or self.rotate or self.translate:
            images = random_affine(images, flip=self.flip, zoom=self.zoom, rotate=self.rotate,
                                   translate=self.translate, fill=fill, interpolation=self.interpolation,
                                   generator=generator)
        if self.randaugment_layers:
            images = RandAugmentLite(self.randaugment_layers, self.randaugment_magnitude)(images, generator)
        return images


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
    """MixUp or CutMix (one of them per batch) with soft targets.

    Each sample is mixed with the batch flipped (``images.flip(0)``) by a factor ``λ ~ Beta(α, α)``;
    with probability ``cutmix_prob`` a box of area share ``1 - λ`` is pasted instead of blending, and ``λ``
    becomes the area actually kept. An alpha of 0 disables that method.

    Returns:
        mixed images ``[B, H, W, C]`` and soft targets ``[B, num_classes]`` (rows sum to 1).
    """
    _check_images(images)
    onehot = F.one_hot(targets, num_classes).to(images.dtype)
    if label_smoothing:
        onehot = onehot * (1 - label_smoothing) + label_smoothing / num_classes
    use_cutmix = cutmix_alpha > 0 and (
        mixup_alpha <= 0 or torch.rand((), generator=generator, device=images.device).item() < cutmix_prob
    )
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0:
        return images, onehot
    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # global CPU RNG
    other = images.flip(0)
    if use_cutmix:
        h, w = images.shape[1:3]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (), generator=generator).item())
        cx = int(torch.randint(w, (), generator=generator).item())
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[:, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + other * (1 - lam)
    return images, onehot * lam + onehot.flip(0) * (1 - lam)
