"""perceivers.data.transforms.sample_crop_boxes: DeepMind's ImageNet training crop
(``tf.image.sample_distorted_bounding_box`` with min_object_covered 0.1, area 0.08..1, ratio 3/4..4/3,
10 attempts, centre-crop fallback).

The area-share figures below are TF's own, from 20,000 draws of the TF op on a 427×640 image
(TensorFlow 2.21): min 0.100, mean 0.354, quantiles 10/50/90 % = 0.133 / 0.326 / 0.618, ratio mean
1.043. Our draws matched TF's in distribution there (two-sample KS on area, height, width and offsets:
p > 0.09 for 427×640, 640×427 and 500×500).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceivers.data.transforms import ImageAugment, random_resized_crop, sample_crop_boxes


def _boxes(n=20000, h=427, w=640, seed=0, **kwargs):
    return sample_crop_boxes(n, h, w, generator=torch.Generator().manual_seed(seed), **kwargs).numpy()


def test_boxes_fit_and_follow_tf_distribution():
    b = _boxes()
    top, left, h, w = b.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 427).all() and (left + w <= 640).all()
    area = h * w / (427 * 640)
    assert area.min() >= 0.1  # min_object_covered: smaller crops are redrawn
    assert abs(area.mean() - 0.354) < 0.01
    assert np.allclose(np.quantile(area, [0.1, 0.5, 0.9]), [0.133, 0.326, 0.618], atol=0.012)
    ratio = w / h
    assert 0.74 < ratio.min() and ratio.max() < 1.34 and abs(ratio.mean() - 1.043) < 0.01


def test_boxes_are_reproducible_and_fall_back_to_the_centre_crop():
    assert np.array_equal(_boxes(100, seed=3), _boxes(100, seed=3))
    # a wide image cannot hold a 99 % crop of ratio near 1: every attempt fails -> eval centre crop
    b = _boxes(8, 100, 400, area_range=(0.99, 1.0))
    side = int(np.float32(224 / 256) * np.float32(100))
    assert (b == [(100 - side + 1) // 2, (400 - side + 1) // 2, side, side]).all()


def test_tf_sampler_crops_whole_pixels():
    x = torch.arange(20 * 30, dtype=torch.float32).reshape(1, 20, 30, 1).repeat(6, 1, 1, 1) / 600
    g = torch.Generator().manual_seed(5)
    boxes = sample_crop_boxes(6, 20, 30, generator=torch.Generator().manual_seed(5))
    out = random_resized_crop(x, scale=(0.08, 1.0), flip=False, sampler="tf", generator=g)
    # the output samples the box (bilinear, half-pixel centres: the edge rows may blend with the row just
    # outside the box when the crop is enlarged, where TF's resize of the cut-out crop repeats the edge)
    for img, (top, left, h, w) in zip(out, boxes.tolist()):
        crop = x[0, max(top - 1, 0) : top + h + 1, max(left - 1, 0) : left + w + 1, 0]
        assert crop.min() - 1e-6 <= img.min() and img.max() <= crop.max() + 1e-6
    with pytest.raises(ValueError, match="sampler must be 'uniform' or 'tf'"):
        random_resized_crop(x, sampler="torchvision")
    with pytest.raises(ValueError, match="crop_sampler"):
        ImageAugment(crop_scale=(0.08, 1.0), crop_sampler="nope")
    assert ImageAugment(crop_scale=(0.08, 1.0), crop_sampler="tf")(x, torch.Generator().manual_seed(0)).shape == x.shape


def _boxes_attempt_by_attempt(batch, height, width, generator, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3),
                              min_object_covered=0.1, max_attempts=10):
    """The sampler written as a loop over attempts (torch ops), the draws in the order sample_crop_boxes makes
    them: per attempt the ratio (float32), then height, top and left (float64)."""
    def below(n):
        return torch.minimum((torch.rand(n.shape, generator=generator, dtype=torch.float64) * n).long(), n - 1)

    boxes = torch.tensor([0, 0, height, width]).repeat(batch, 1)
    done = torch.zeros(batch, dtype=torch.bool)
    min_area = torch.tensor(area_range[0], dtype=torch.float32) * width * height
    max_area = torch.tensor(area_range[1], dtype=torch.float32) * width * height
    for _ in range(max_attempts):
        ratio = torch.rand(batch, generator=generator) * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
        h = torch.round(torch.sqrt(min_area / ratio)).long()
        max_h = torch.round(torch.sqrt(max_area / ratio)).long()
        too_wide = torch.round(max_h * ratio).long() > width
        max_h = torch.where(too_wide, ((width + 0.5 - 1e-7) / ratio.double()).long(), max_h)
        max_h = torch.where(too_wide & (torch.round(max_h * ratio).long() > width), max_h - 1, max_h)
        h = torch.minimum(h, max_h.clamp(max=height))
        h = h + below((max_h.clamp(max=height) - h + 1).clamp(min=1))
        w = torch.round(h * ratio).long()
        h = torch.where((w * h).float() < min_area, h + 1, h)
        w = torch.round(h * ratio).long()
        h = torch.where((w * h).float() > max_area, h - 1, h)
        w = torch.round(h * ratio).long()
        area = (w * h).float()
        ok = (area >= min_area) & (area <= max_area) & (w <= width) & (h <= height) & (w > 0) & (h > 0)
        ok &= area / (width * height) >= min_object_covered
        top = torch.where(h < height, below((height - h).clamp(min=1)), 0)
        left = torch.where(w < width, below((width - w).clamp(min=1)), 0)
        boxes = torch.where((ok & ~done)[:, None], torch.stack([top, left, h, w], 1), boxes)
        done |= ok
    side = int(np.float32(224 / 256) * np.float32(min(height, width)))
    centre = torch.tensor([(height - side + 1) // 2, (width - side + 1) // 2, side, side])
    return torch.where((boxes[:, 2:] == torch.tensor([height, width])).all(1)[:, None], centre, boxes)


@pytest.mark.parametrize("shape", [(427, 640), (640, 427), (500, 500), (20, 400), (3, 5), (1, 1)])
@pytest.mark.parametrize("batch", [1, 5])
def test_all_attempts_at_once_draw_as_the_attempt_loop(shape, batch):
    """sample_crop_boxes evaluates every attempt at once (numpy) but consumes the generator as the loop over
    attempts does: same boxes, same generator state afterwards."""
    for seed in range(40):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        kwargs = {"area_range": (0.3, 0.9), "ratio_range": (0.5, 2.0)} if seed % 4 == 3 else {}
        want = _boxes_attempt_by_attempt(batch, *shape, g1, **kwargs)
        got = sample_crop_boxes(batch, *shape, generator=g2, area_range=kwargs.get("area_range", (0.08, 1.0)),
                                aspect_ratio_range=kwargs.get("ratio_range", (3 / 4, 4 / 3)))
        assert torch.equal(got, want), (seed, got, want)
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    no_attempt = sample_crop_boxes(2, *shape, max_attempts=0)
    assert torch.equal(no_attempt, _boxes_attempt_by_attempt(2, *shape, torch.Generator(), max_attempts=0))
