"""perceivers.data.transforms: inputs of the wrong dtype or range are refused rather than mixed or clamped
(behaviour on good inputs: tests/train/test_train_transforms.py and tests/data/test_randaugment.py)."""

from __future__ import annotations

import pytest
import torch

from perceivers.data.transforms import (
    RandAugment,
    channel_stats,
    mix_batch,
    random_affine,
    random_resized_crop,
)


def test_mix_batch_refuses_uint8_images_and_float_targets():
    """In uint8, λ became 0: every image turned into its partner and every soft target into the partner's one-hot."""
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    targets = torch.arange(4)
    with pytest.raises(TypeError, match="mix_batch takes floating-point images .* got dtype torch.uint8"):
        mix_batch(images, targets, 4, cutmix_alpha=0.0)
    with pytest.raises(TypeError, match="targets must be integer class ids"):
        mix_batch(images.float(), targets.float(), 4)
    with pytest.raises(ValueError, match=r"targets must be \[B\] = \[4\] class ids, got shape \(3,\)"):
        mix_batch(images.float(), targets[:3], 4)
    _, soft = mix_batch(images.float(), targets, 4, cutmix_alpha=0.0, generator=torch.Generator().manual_seed(1))
    assert soft.dtype == torch.float32 and torch.allclose(soft.sum(-1), torch.ones(4))


@pytest.mark.parametrize("fn", [random_affine, random_resized_crop])
def test_geometric_transforms_name_the_image_dtype(fn):
    """uint8 images failed inside affine_grid with 'Expected theta to have floating point type'."""
    with pytest.raises(TypeError, match=f"{fn.__name__} takes floating-point images .* got dtype torch.uint8"):
        fn(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))


@pytest.mark.parametrize("images", [torch.rand(2, 8, 8, 3) * 255, torch.randn(2, 8, 8, 3),
                                    torch.full((1, 4, 4, 3), float("nan"))])
def test_randaugment_refuses_float_images_outside_unit_range(images):
    """0..255 floats were clamped to a white picture, standardised values to black/white, NaN to grey."""
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\]"):
        RandAugment(2, 5)(images)
    ok = torch.rand(2, 8, 8, 3) * 1.004 - 0.002  # resampling round-off is accepted
    assert RandAugment(2, 5)(ok).shape == ok.shape


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_channel_stats_refuses_non_finite_images(bad):
    """A NaN gave NaN statistics without a word, and Normalize.fit then turned every batch into NaN."""
    images = torch.rand(2, 4, 4, 3)
    images[1, 2, 3, 1] = bad
    with pytest.raises(ValueError, match="channel_stats: the images hold NaN or Inf"):
        channel_stats(images)
    with pytest.raises(ValueError, match="NaN or Inf"):
        channel_stats([torch.rand(2, 4, 4, 3), images])
    mean, std = channel_stats(torch.rand(2, 4, 4, 3))
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
