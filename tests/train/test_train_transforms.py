"""Batched torch-only augmentation: shapes, identities, statistics, MixUp/CutMix targets."""

from __future__ import annotations

import pytest
import torch

from perceivers.data.transforms import (
    ImageAugment,
    Normalize,
    RandAugment,
    channel_stats,
    mix_batch,
    random_affine,
    random_resized_crop,
    resize,
    to_float,
)


def _images(b: int = 4, h: int = 8, w: int = 6, c: int = 3) -> torch.Tensor:
    return torch.rand(b, h, w, c)


def test_to_float_scales_uint8_and_rejects_ints():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.equal(to_float(x), torch.tensor([[[[0.0, 1.0]]]]))
    with pytest.raises(TypeError, match="uint8 or floating"):
        to_float(torch.ones(1, 2, 2, 1, dtype=torch.int32))


def test_resize_shapes_and_constant_image():
    x = torch.full((2, 8, 8, 3), 0.25)
    out = resize(x, 16)
    assert out.shape == (2, 16, 16, 3)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
    assert resize(x, (4, 2)).shape == (2, 4, 2, 3)


def test_affine_without_randomness_is_identity():
    x = _images()
    torch.testing.assert_close(random_affine(x, flip=False), x, atol=1e-5, rtol=0)


def test_affine_flip_mirrors_some_images():
    x = _images(b=32)
    out = random_affine(x, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.allclose(o, i.flip(1), atol=1e-5) for o, i in zip(out, x)]
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and 0 < sum(flipped) < 32


def test_affine_fill_and_zoom_out_uses_fill_value():
    x = torch.ones(2, 8, 8, 1)
    out = random_affine(x, flip=False, zoom=(0.5, 0.5), fill=-1.0)  # shrink: borders come from outside
    assert out[:, 0, 0, 0].allclose(torch.tensor(-1.0)) and out[:, 4, 4, 0].allclose(torch.tensor(1.0))


def test_resized_crop_output_size_and_full_crop_identity():
    x = _images()
    assert random_resized_crop(x, 5).shape == (4, 5, 5, 3)
    full = random_resized_crop(x, scale=(1.0, 1.0), ratio=(x.shape[2] / x.shape[1],) * 2, flip=False)
    torch.testing.assert_close(full, x, atol=1e-5, rtol=0)


def test_normalize_fit_gives_zero_mean_unit_std():
    x = torch.rand(64, 4, 4, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([0.0, 1.0, -2.0])
    norm = Normalize.fit(x)
    y = norm(x)
    torch.testing.assert_close(y.mean((0, 1, 2)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std((0, 1, 2), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


def test_channel_stats_streams_batches_like_one_tensor():
    x = torch.randint(0, 256, (10, 3, 3, 3), dtype=torch.uint8)
    whole = channel_stats(x)
    streamed = channel_stats([x[:3], x[3:]])
    for a, b in zip(whole, streamed):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole[0], x.float().div(255).mean((0, 1, 2)))


def test_normalize_rejects_bad_std_and_channel_mismatch():
    with pytest.raises(ValueError, match="positive"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match="channels"):
        Normalize([0.0, 0.0], [1.0, 1.0])(torch.rand(1, 2, 2, 3))


def test_randaugment_keeps_shape_and_range():
    x = _images(b=16)
    out = RandAugment(num_layers=3, magnitude=9)(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5


def test_image_augment_composes():
    aug = ImageAugment(flip=True, zoom=0.2, rotate=10, translate=0.1, crop_scale=None, randaugment_layers=1)
    assert aug(torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)).dtype == torch.float32
    assert ImageAugment(crop_scale=(0.5, 1.0))(_images()).shape == (4, 8, 6, 3)


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0)])
def test_mix_batch_soft_targets_sum_to_one(mixup, cutmix):
    torch.manual_seed(0)
    x, y = _images(b=6), torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, soft = mix_batch(x, y, 5, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
    assert mixed.shape == x.shape and soft.shape == (6, 5)
    torch.testing.assert_close(soft.sum(-1), torch.ones(6))
    # each row mixes its own label with the flipped batch's
    for i in range(6):
        assert set(soft[i].nonzero().flatten().tolist()) >= {int(y[i])} or soft[i].min() > 0


def test_nearest_shifts_move_whole_pixels():
    x = torch.rand(16, 8, 8, 1)
    out = random_affine(x, flip=False, translate=0.125, interpolation="nearest", fill=-1.0,
                        generator=torch.Generator().manual_seed(0))
    for o, i in zip(out, x):  # every output pixel is an input pixel or the fill value: no blur
        allowed = torch.cat([i.flatten(), torch.tensor([-1.0])])
        assert ((o.flatten()[:, None] - allowed[None]).abs().min(dim=1).values < 1e-5).all()
    with pytest.raises(ValueError, match="interpolation"):
        random_affine(x, interpolation="cubic")


def test_mix_batch_splits_each_batch_and_draws_per_sample():
    # DeepMind's recipe: half of every batch CutMix, half MixUp, each sample with its own ratio
    x = torch.rand(8, 16, 16, 3)
    y = torch.arange(8)
    gen = torch.Generator().manual_seed(0)
    mixed, soft = mix_batch(x, y, 8, mixup_alpha=0.2, cutmix_alpha=1.0, cutmix_prob=0.5, generator=gen)
    partner = x.flip(0)
    from_self = (mixed == x).all(-1)
    from_partner = (mixed == partner).all(-1)
    is_cut = (from_self | from_partner).flatten(1).all(1)  # every pixel copied from one of the two
    assert is_cut.sum() == 4
    own = soft[torch.arange(8), y]  # the own label's share
    kept = from_self.flatten(1).float().mean(1)
    torch.testing.assert_close(own[is_cut], kept[is_cut])  # CutMix weight = area kept
    assert len(set(own[~is_cut].tolist())) == 4  # MixUp: one ratio per sample
    again = mix_batch(x, y, 8, mixup_alpha=0.2, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)
