"""ImageNetTrainTransform: DeepMind's per-image ImageNet training pipeline (perceiver/train/dataset.py).

Official order: crop box from the whole decoded image (tf.image.sample_distorted_bounding_box), crop the uint8
image, random left-right flip, RandAugment on the uint8 crop, TF bicubic resize to 224 (float32, unclamped),
(x - 255 mean) / (255 std). The TF resize of such crops was compared with tf.image.resize (TF 2.21) on crops of
scikit-learn's sample photos: within 1.3e-4 on the 0..255 scale (float32 rounding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceivers.data import IMAGENET_MEAN, IMAGENET_STD, ImageNetEvalTransform, ImageNetTrainTransform
from perceivers.data.image import load_image, resize_bicubic
from perceivers.data.transforms import RandAugment, sample_crop_boxes


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A natural photograph, 150×200 (scikit-learn's china.jpg, downsampled)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    image = Image.fromarray(load_sample_images().images[0])
    return np.asarray(image.resize((200, 150), Image.Resampling.BILINEAR))


def _reference(pixels: np.ndarray, seed: int, size: int = 224) -> torch.Tensor:
    """The official steps composed by hand, drawing from one generator in the official order."""
    g = torch.Generator().manual_seed(seed)
    top, left, h, w = sample_crop_boxes(1, *pixels.shape[:2], generator=g)[0].tolist()
    crop = torch.from_numpy(pixels[top : top + h, left : left + w].copy())
    if torch.rand((), generator=g) < 0.5:
        crop = crop.flip(1)
    crop = RandAugment(4, 5.0)(crop[None], g)[0]  # uint8 in, uint8 out, at the crop's own size
    assert crop.dtype == torch.uint8 and crop.shape[:2] == (h, w)
    resized = resize_bicubic(crop.numpy(), (size, size), "tf")  # float32, unclamped
    normalized = (resized - np.float32(255) * np.asarray(IMAGENET_MEAN, np.float32)) / (
        np.float32(255) * np.asarray(IMAGENET_STD, np.float32))
    return torch.from_numpy(normalized).permute(2, 0, 1)


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_official_steps_composed_by_hand(photo, seed):
    got = ImageNetTrainTransform()(photo, generator=torch.Generator().manual_seed(seed))
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got, _reference(photo, seed))


def test_crop_is_augmented_before_the_resize(photo):
    transform = ImageNetTrainTransform()
    flips = set()
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        box = sample_crop_boxes(1, *photo.shape[:2], generator=torch.Generator().manual_seed(seed))[0].tolist()
        crop = transform.crop(photo, g)
        assert crop.dtype == np.uint8 and crop.shape == (box[2], box[3], 3)  # the box's size, not 224
        plain = ImageNetTrainTransform(randaugment_layers=0).crop(photo, torch.Generator().manual_seed(seed))
        cut = photo[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
        flips.add(bool(np.array_equal(plain, cut[:, ::-1])) and not np.array_equal(plain, cut))
        assert np.array_equal(plain, cut) or np.array_equal(plain, cut[:, ::-1])
    assert flips == {True, False}  # both flip outcomes occur over 8 seeds


def test_overshoot_is_kept_and_draws_follow_the_generator(photo):
    transform = ImageNetTrainTransform(randaugment_layers=0, flip=False)
    a = transform(photo, torch.Generator().manual_seed(3))
    assert torch.equal(a, transform(photo, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, transform(photo, torch.Generator().manual_seed(4)))
    # TF's bicubic resize is not clamped: black/white edges overshoot [0, 255] in the normalised image too
    stripes = np.zeros((60, 80, 3), dtype=np.uint8)
    stripes[:, (np.arange(80) // 4) % 2 == 0] = 255
    out = transform(stripes, torch.Generator().manual_seed(0))
    low = (0 - 255 * torch.tensor(IMAGENET_MEAN)) / (255 * torch.tensor(IMAGENET_STD))
    high = (255 - 255 * torch.tensor(IMAGENET_MEAN)) / (255 * torch.tensor(IMAGENET_STD))
    assert (out.amin(dim=(1, 2)) < low - 0.1).all() and (out.amax(dim=(1, 2)) > high + 0.1).all()


def test_failed_draws_fall_back_to_the_evaluation_crop():
    # 20×400: no crop of ratio 3/4..4/3 covers 8 % of the image, so every attempt fails
    pixels = np.random.default_rng(0).integers(0, 256, (20, 400, 3), dtype=np.uint8)
    got = ImageNetTrainTransform(size=32, flip=False, randaugment_layers=0)(pixels, torch.Generator().manual_seed(0))
    assert torch.equal(got, ImageNetEvalTransform(size=32)(pixels))


def test_reads_files_as_the_evaluation_transform(tmp_path, photo):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    transform = ImageNetTrainTransform(size=64)
    assert np.array_equal(load_image(path), photo)
    assert torch.equal(transform(path, torch.Generator().manual_seed(1)), transform(photo, torch.Generator().manual_seed(1)))


def test_resize_bicubic_taps_equal_the_dense_weights(photo):
    """The 4-tap resize computes what the dense [out, in] weight matrices give (up to float64 summation order)."""
    from perceivers.data.image import _tf_bicubic_matrix

    for shape, size in [((150, 200), (224, 224)), ((37, 91), (224, 60)), ((150, 200), (7, 300))]:
        crop = np.ascontiguousarray(photo[: shape[0], : shape[1]])
        dense = np.einsum("yh,hwc,xw->yxc", _tf_bicubic_matrix(shape[0], size[0]), crop.astype(np.float64),
                          _tf_bicubic_matrix(shape[1], size[1]), optimize=True).astype(np.float32)
        np.testing.assert_allclose(resize_bicubic(crop, size, "tf"), dense, rtol=0, atol=1e-4)
