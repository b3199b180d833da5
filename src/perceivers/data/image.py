"""ImageNet preprocessing per image (PIL + numpy + torch) and the ImageNet-1k class names.

The official evaluation pipeline (``perceiver/train/dataset.py``): square centre crop of side
``int(224/256 · min(H, W))`` at offsets ``((H − s) + 1) // 2``, ``((W − s) + 1) // 2``; bicubic resize to
224×224 with TensorFlow's kernel (Keys a = −0.5, half-pixel centres, no antialias, no clamping);
``(x − 255·mean) / (255·std)`` with the ImageNet mean/std; RGB. Our models take NCHW, so the
result is ``[3, 224, 224]`` float32 per image. :class:`ImageNetTrainTransform` is the same file's training
pipeline: a random crop of the whole image, flip and RandAugment on the uint8 crop, then the same resize and
normalisation. Both decode JPEG files as TensorFlow does (:func:`load_window`, :mod:`perceivers.data.jpeg`:
libjpeg-turbo's fast integer DCT through simplejpeg, when it is installed).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .jpeg import decode_jpeg, have_tf_decoder, is_jpeg, jpeg_info
from .transforms import RandAugment, sample_crop_boxes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetEvalTransform",
    "ImageNetTrainTransform",
    "center_crop_box",
    "imagenet_class_names",
    "load_image",
    "load_window",
    "resize_bicubic",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Resample = Literal["tf", "pil", "torch"]
CropRounding = Literal["official", "transformers"]
Decoder = Literal["tf", "pil"]
Window = tuple[int, int, int, int]  # (top, left, height, width)


def load_image(image: object) -> np.ndarray:
    """A path, PIL image, ``[H, W, 3]`` array or ``[H, W, 3]`` tensor → ``uint8 [H, W, 3]`` RGB array.

    Arrays may also be grey (``[H, W]``, ``[H, W, 1]``) or RGBA (alpha dropped). ``uint16`` arrays are 16-bit
    images, scaled from [0, 65535] as 16-bit files are; other arrays are taken to hold values in [0, 255] and
    are rounded and clipped (a float array within [0, 1] gets a warning: it reads almost black). Files are read as stored: an EXIF orientation tag is not applied (TensorFlow's
    decoder in the official pipeline ignores it too); call ``PIL.ImageOps.exif_transpose`` first to apply it.
    """
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        try:
            im = Image.open(image)
            im.load()
        except FileNotFoundError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # PIL: unidentified, truncated or corrupt file
            raise ValueError(f"{os.fspath(image)} is not a readable image ({type(e).__name__}: {e})") from e
        with im:
            return _rgb(im, os.fspath(image))
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"an image array must be [H, W, 3] (channels last), got shape {image.shape}")
        image = image[:, :, :3]
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise ValueError(f"an image array must be finite, got {int((~np.isfinite(image)).sum())} NaN/Inf values")
        if image.dtype == np.uint16:  # 16 bits: clipping at 255 would leave an almost white picture
            return np.rint(image / 257.0).astype(np.uint8)
        if image.dtype.kind == "f" and image.size and 0 <= image.min() and 0 < image.max() <= 1:
            warnings.warn(
                f"a float image array with values in [0, 1] (max {float(image.max()):.3g}) is read as 0..255 (as "
                "transformers' processors read float images), so it comes out almost black; pass values in [0, 255] "
                "(e.g. `image * 255`) or uint8", UserWarning, stacklevel=2)
        if image.dtype != np.uint8:
            image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return image
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - PIL is a test/train dependency
        raise TypeError(f"unsupported image type {type(image).__name__}") from e
    if isinstance(image, Image.Image):
        return _rgb(image, "the image")
    raise TypeError(f"image must be a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def _rgb(im: Any, name: str) -> np.ndarray:
    """A PIL image → ``uint8 [H, W, 3]``. 16-bit greyscale (modes ``I;16*``, and ``I``, as PIL opens 16-bit PNGs)
    is scaled from [0, 65535] (PIL's own conversion clips it at 255: an almost white picture); float images (mode
    ``F``) have no standard range and are refused."""
    if im.mode == "F":
        raise ValueError(f"{name} is a float image (PIL mode F), which has no standard range: save it with 8 or 16 "
                         "bits, or pass an array of values in [0, 255]")
    if im.mode == "I" or im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"{name} is a 32-bit integer image with values in [{grey.min()}, {grey.max()}]; "
                             "expected 16-bit values in [0, 65535]")
        grey = np.rint(grey / 257.0).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def load_window(image: object, window: Callable[[int, int], Window], decoder: Decoder = "tf") -> np.ndarray:
    """Decode ``image`` and cut out ``window(height, width)`` → ``uint8 [h, w, 3]`` (a writable array).

    With ``decoder="tf"``, a JPEG file (path) is decoded as TensorFlow's ``decode_and_crop_jpeg`` decodes it,
    pixel for pixel (:func:`~perceivers.data.jpeg.decode_jpeg`: the fast integer DCT, and the crop's edge
    columns as libjpeg-turbo's cropped decode gives them), when simplejpeg is installed; the window is chosen
    from the size in the file's header, as DeepMind's pipeline does. Everything else (``decoder="pil"``,
    no simplejpeg, other formats, arrays, PIL images) goes through :func:`load_image` and is cut from it.
    """
    if decoder not in ("tf", "pil"):
        raise ValueError(f"decoder must be 'tf' or 'pil', got {decoder!r}")
    box = None
    if decoder == "tf" and isinstance(image, (str, os.PathLike)) and have_tf_decoder():
        with open(image, "rb") as f:
            data = f.read()
        info = _jpeg_header(data)
        if info is not None:
            box = window(info.height, info.width)  # drawn once: the window may be random
            try:
                return decode_jpeg(data, box)
            except ValueError:
                pass  # corrupt data: Pillow decodes what it can, or names the file in its error
    pixels = load_image(image)
    top, left, height, width = window(pixels.shape[0], pixels.shape[1]) if box is None else box
    return np.array(pixels[top : top + height, left : left + width])


def _jpeg_header(data: bytes) -> Any:
    """The JPEG frame header of a file's bytes, None for other formats or a corrupt header."""
    if not is_jpeg(data):
        return None
    try:
        return jpeg_info(data)
    except ValueError:
        return None


def center_crop_box(
    height: int, width: int, size: int = 224, crop_padding: int = 32, rounding: CropRounding = "official"
) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square centre crop, ``side = int(size / (size + crop_padding) · min(H, W))``.

    Args:
        rounding: ``"official"`` — the official pipeline: the fraction in float32 and the offsets rounded
            up, ``((H − side) + 1) // 2``; ``"transformers"`` — transformers' ``PerceiverImageProcessor``:
            the fraction in float64 and the offsets rounded down, ``(H − side) // 2``. The two differ by one
            pixel where a margin ``H − side`` is odd.
    """
    if rounding == "official":
        side = int(np.float32(size / (size + crop_padding)) * np.float32(min(height, width)))
    elif rounding == "transformers":
        side = int(size / (size + crop_padding) * min(height, width))
    else:
        raise ValueError(f"rounding must be 'official' or 'transformers', got {rounding!r}")
    if side < 1:
        need = next(n for n in range(1, size + crop_padding + 2) if int(size / (size + crop_padding) * n) >= 1)
        raise ValueError(f"image of {height}×{width} is too small to crop: the crop side int({size}/{size + crop_padding}"
                         f" · {min(height, width)}) is 0; the shorter side must be at least {need} pixels")
    up = int(rounding == "official")
    return (height - side + up) // 2, (width - side + up) // 2, side


def _keys_cubic(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``t``."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


@lru_cache(maxsize=256)
def _tf_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights ``[out, 4]`` of TensorFlow's ``resize_bicubic(half_pixel_centers=True)``.

    Keys a = −0.5 sampled at the fractional offset quantised to 1/1024 (TF's coefficient table);
    taps that fall outside the image get weight 0 (their index is clamped) and the rest are renormalised
    to sum to 1.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centres = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    base = np.floor(centres).astype(np.int64)
    delta = np.rint((centres - base).astype(np.float64) * 1024) / 1024
    taps = np.arange(-1, 3)
    index = base[:, None] + taps
    weights = np.where((index >= 0) & (index < in_size), _keys_cubic(delta[:, None] - taps, -0.5), 0.0)
    return np.clip(index, 0, in_size - 1), weights / weights.sum(axis=1, keepdims=True)


def _tf_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The same weights as a dense ``[out, in]`` matrix."""
    index, weights = _tf_bicubic_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.arange(out_size)[:, None], index), weights)
    return matrix


def resize_bicubic(image: np.ndarray, size: tuple[int, int], method: Resample = "tf") -> np.ndarray:
    """Bicubic resize of ``uint8 [H, W, 3]`` to ``float32 [h, w, 3]`` (values on the 0..255 scale).

    Args:
        method: ``"tf"`` TensorFlow's ``tf.image.resize(..., BICUBIC)`` as in the official eval
            pipeline (unclamped, so values may leave [0, 255]); ``"pil"`` PIL's ``BICUBIC`` on uint8
            (antialiased when shrinking, rounded and clamped; transformers' processor);
            ``"torch"`` ``F.interpolate(mode="bicubic")`` (Keys a = −0.75 like OpenCV's INTER_CUBIC,
            which the official colab used).
    """
    h, w = size
    if method == "tf":
        # four taps per output pixel and axis (a dense matrix product costs ~100x more, and BLAS threads in
        # data-loader workers oversubscribe the CPU)
        iy, wy = _tf_bicubic_taps(image.shape[0], h)
        ix, wx = _tf_bicubic_taps(image.shape[1], w)
        rows = np.einsum("yt,ytxc->yxc", wy, image[iy].astype(np.float64))  # [h, W, C]
        out = np.einsum("xt,yxtc->yxc", wx, rows[:, ix])  # [h, w, C]
        return out.astype(np.float32)
    if method == "pil":
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    if method == "torch":
        x = torch.from_numpy(image).permute(2, 0, 1)[None].double()
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
        return x[0].permute(1, 2, 0).float().numpy()
    raise ValueError(f"method must be 'tf', 'pil' or 'torch', got {method!r}")


@dataclass
class ImageNetEvalTransform:
    """Image → normalised ``float32 [3, size, size]`` tensor (NCHW per image), the official eval recipe.

    Args:
        size: output side (224), or ``(height, width)``: the square crop is then resized to that shape
            (the crop fraction uses the smaller of the two).
        crop_padding: crop side is ``size / (size + crop_padding)`` of the shorter side (224/256).
        resample: see :func:`resize_bicubic`; ``"tf"`` follows the official pipeline, ``"pil"``
            transformers' ``PerceiverImageProcessor``.
        mean, std: per-channel statistics on the 0..1 scale.
        crop_rounding: crop arithmetic, see :func:`center_crop_box`. ``resample="pil"`` with
            ``crop_rounding="transformers"`` reproduces transformers' processor (within 1e-5) for every image size
            from 2 pixels a side (an image 1 pixel high or wide has no crop: ``ValueError``).
        decoder: how JPEG files are decoded, see :func:`load_window`: ``"tf"`` TensorFlow's pixels (when
            simplejpeg is installed; Pillow otherwise), ``"pil"`` Pillow's (as transformers' processor gets them).
    """

    size: int | tuple[int, int] = 224
    crop_padding: int = 32
    resample: Resample = "tf"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_rounding: CropRounding = "official"
    decoder: Decoder = "tf"

    def __call__(self, image: object) -> Tensor:
        """One image (path, PIL, ``[H, W, 3]`` array/tensor) → ``[3, height, width]``."""
        out_size = _pair(self.size)

        def window(height: int, width: int) -> Window:
            top, left, side = center_crop_box(height, width, min(out_size), self.crop_padding, self.crop_rounding)
            return top, left, side, side

        crop = load_window(image, window, self.decoder)
        return _normalized_chw(resize_bicubic(crop, out_size, self.resample), self.mean, self.std)

    def batch(self, images: Sequence[object]) -> Tensor:
        """A list of images → ``[B, 3, height, width]``."""
        return torch.stack([self(im) for im in images])


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """An output size: a side, or ``(height, width)``."""
    return (size, size) if isinstance(size, int) else tuple(size)


def _normalized_chw(resized: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``float32 [h, w, 3]`` on the 0..255 scale → ``(x − 255·mean) / (255·std)`` as ``[3, h, w]``."""
    mean = np.asarray(mean, dtype=np.float32) * 255
    std = np.asarray(std, dtype=np.float32) * 255
    return torch.from_numpy((resized - mean) / std).permute(2, 0, 1).contiguous()


@dataclass
class ImageNetTrainTransform:
    """Image → normalised ``float32 [3, size, size]``: DeepMind's ImageNet training pipeline for one image.

    The steps of the official ``perceiver/train/dataset.py``, in its order: a crop box drawn from the whole
    decoded image as ``tf.image.sample_distorted_bounding_box`` draws it (:func:`~perceivers.data.transforms.
    sample_crop_boxes`: area 0.08–1, ratio 3/4–4/3, ``min_object_covered`` 0.1, 10 attempts, else the
    evaluation centre crop), cut out of the uint8 image; a left-right flip with probability 1/2;
    :class:`~perceivers.data.transforms.RandAugment` on the uint8 crop at its own size (so its pixel constants,
    translate 100 and cutout 40, are pixels of the crop); TF bicubic resize to ``size`` (float, unclamped);
    ``(x − 255·mean) / (255·std)``. Random draws come from ``generator`` in that order: the crop, the flip,
    RandAugment.

    Args:
        size: output side, or ``(height, width)``.
        area_range, aspect_ratio_range: the crop's area share and width / height ratio ranges.
        flip: random left-right flips.
        randaugment_layers, randaugment_magnitude: RandAugment's N and M (0 layers: none; DeepMind: 4, 5).
        crop_padding: the fallback centre crop's side is ``size / (size + crop_padding)`` of the shorter side.
        mean, std: per-channel statistics on the 0..1 scale.
        decoder: ``"tf"`` decodes JPEG files as ``tf.io.decode_and_crop_jpeg`` does, pixel for pixel (needs
            simplejpeg; Pillow otherwise), ``"pil"`` with Pillow; see :func:`load_window`.
    """

    size: int | tuple[int, int] = 224
    area_range: tuple[float, float] = (0.08, 1.0)
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment_layers: int = 4
    randaugment_magnitude: float = 5.0
    crop_padding: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    decoder: Decoder = "tf"

    def __post_init__(self) -> None:
        self.area_range = tuple(self.area_range)
        self.aspect_ratio_range = tuple(self.aspect_ratio_range)
        self._randaugment = (RandAugment(self.randaugment_layers, self.randaugment_magnitude)
                             if self.randaugment_layers else None)

    def crop(self, image: object, generator: torch.Generator | None = None) -> np.ndarray:
        """The augmented ``uint8 [h, w, 3]`` crop before the resize (crop, flip, RandAugment)."""
        out_size = _pair(self.size)

        def window(height: int, width: int) -> Window:
            return tuple(sample_crop_boxes(
                1, height, width, area_range=self.area_range, aspect_ratio_range=self.aspect_ratio_range,
                crop_padding=self.crop_padding, output_size=min(out_size), generator=generator)[0].tolist())

        crop = torch.from_numpy(load_window(image, window, self.decoder))
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            crop = crop.flip(1)
        if self._randaugment is not None:
            crop = self._randaugment(crop[None], generator)[0]
        return np.ascontiguousarray(crop.numpy())

    def __call__(self, image: object, generator: torch.Generator | None = None) -> Tensor:
        """One image (path, PIL, ``[H, W, 3]`` array/tensor) → ``[3, height, width]``."""
        out_size = _pair(self.size)
        return _normalized_chw(resize_bicubic(self.crop(image, generator), out_size, "tf"), self.mean, self.std)


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard order (index = logit index of the models).

    Short WordNet lemmas (``"tench"``, ``"goldfish"``, …, ``"toilet tissue"``); two names repeat
    (``crane`` 134/517, ``maillot`` 638/639) as they do in ImageNet itself.
    """
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names
