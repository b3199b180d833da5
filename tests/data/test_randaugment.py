"""RandAugment (DeepMind's Perceiver IO / TF TPU version): every op against PIL on small real images.

PIL's ImageOps / ImageEnhance / Image.transform are what the TensorFlow ops were written to reproduce. Where
the TF op (and so ours) deliberately differs, the test pins the difference:

- AutoContrast: PIL builds its table in float64, TF in float32: a few pixels one level apart.
- Color (and Contrast with ``contrast_mean="pil"``): TF's grey is ``trunc(luma · 255.5 / 255)`` with weights
  (0.2989, 0.587, 0.114); PIL rounds (299, 587, 114) / 1000 in fixed point: greys up to one level apart, so
  results up to one level apart.
- Contrast with ``contrast_mean="tf"``: the TF op blends from ``pixel count / 256`` (the mean of the grey
  *histogram*), not from the mean grey level; pinned against that formula.
- Sharpness: PIL rounds the smoothed image, TF truncates it: up to one level apart (borders unchanged in both).
  TF truncates a float32 sum (fused multiply-adds in row-major order), one level off the exact integer
  sum / 13 on a few pixels; we reproduce TF's sum (tests/data/test_randaugment_tf_parity.py pins it).
- Solarize at magnitude 10: TF casts the threshold 256 to uint8, i.e. 0, so every level is inverted (PIL's
  threshold 256 inverts nothing).
- ShearX / ShearY: TF shears about the centre of the top-left pixel, PIL about its outer corner, so the
  nearest pixel differs along a few diagonals; with PIL's offset moved by half a pixel they agree exactly.
- Posterize at magnitude < 2.5 maps to 0 bits, which TF's clamped shift turns into 1 bit (PIL: black).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from perceivers.data.transforms import RANDAUGMENT_OPS, ImageAugment, RandAugment

GREY = (128, 128, 128)


def _natural_rgb(h: int = 26, w: int = 22, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, a bright patch, a dark stripe and sensor-like noise (uint8 [H, W, 3])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([40 + 150 * xx / w, 30 + 120 * yy / h, 100 + 60 * np.sin(xx / 3 + yy / 5)], -1)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] += (90, -20, 40)
    img[:, w - 5 : w - 3] *= 0.3
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _digit_rgb(index: int = 3, scale: int = 3) -> np.ndarray:
    """A handwritten digit (sklearn's 8×8 set, 0..16) upscaled and coloured: uint8 [8·scale, 8·scale, 3]."""
    from sklearn.datasets import load_digits

    digit = load_digits().images[index] / 16.0
    digit = np.kron(digit, np.ones((scale, scale)))
    img = np.stack([30 + 200 * digit, 60 + 120 * digit, 200 - 150 * digit], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


IMAGES = {"natural": _natural_rgb(), "digit": _digit_rgb()}


@pytest.fixture(params=sorted(IMAGES))
def image(request) -> np.ndarray:
    return IMAGES[request.param]


def _ours(img: np.ndarray, op: str, magnitude: float, **kwargs) -> np.ndarray:
    aug_kwargs = {k: kwargs.pop(k) for k in ("translate_const", "cutout_const", "contrast_mean") if k in kwargs}
    aug = RandAugment(1, magnitude, **aug_kwargs)
    out = aug.apply_op(torch.from_numpy(img)[None], op, negate=kwargs.pop("negate", False), **kwargs)
    return out[0].numpy()


def _diff(a: np.ndarray, b) -> np.ndarray:
    return np.abs(a.astype(np.int64) - np.asarray(b).astype(np.int64))


# ---------------------------------------------------------------------------------- argument mappings
def test_arguments_follow_the_tf_level_mappings():
    ra = RandAugment(4, 5)  # DeepMind's ImageNet setting
    assert ra.argument("Rotate") == 15.0 and ra.argument("ShearX") == 0.15
    assert ra.argument("TranslateY") == 50.0 and ra.argument("Cutout") == 20
    assert ra.argument("Posterize") == 2 and ra.argument("Solarize") == 128 and ra.argument("SolarizeAdd") == 55
    for op in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert ra.argument(op) == 1.0  # 5/10 · 1.8 + 0.1: exactly 1, these four are no-ops at M = 5
    top = RandAugment(1, 10)
    assert top.argument("Rotate") == 30.0 and top.argument("Posterize") == 4
    assert top.argument("Solarize") == 256 and top.argument("SolarizeAdd") == 110
    assert math.isclose(top.argument("Color"), 1.9) and top.argument("TranslateX") == 100.0
    assert RandAugment(1, 3).argument("Cutout") == 12  # int(0.3 · 40)
    assert len(RANDAUGMENT_OPS) == 16 and len(set(RANDAUGMENT_OPS)) == 16


# ---------------------------------------------------------------------------------- ops against PIL
def test_autocontrast_equalize_invert_match_pil(image):
    pil = Image.fromarray(image)
    ours = _ours(image, "AutoContrast", 5)
    # TF: per channel, level · s + o in float32 with s = 255 / (hi - lo), o = -lo · s, then truncated
    lo, hi = image.min((0, 1)).astype(np.float32), image.max((0, 1)).astype(np.float32)
    s = np.float32(255) / (hi - lo)
    tf = np.floor(np.clip(image.astype(np.float32) * s + (-lo * s), 0, 255))
    assert _diff(ours, tf).max() == 0
    # PIL builds the same table in float64: one level apart where the exact value is a whole number that
    # float32 and float64 round to opposite sides of
    d = _diff(ours, ImageOps.autocontrast(pil))
    exact = (image - lo.astype(np.float64)) * 255 / (hi - lo).astype(np.float64)
    assert d.max() <= 1 and np.all(np.abs(exact[d > 0] - np.round(exact[d > 0])) < 1e-3)
    assert _diff(_ours(image, "Equalize", 5), ImageOps.equalize(pil)).max() == 0
    assert _diff(_ours(image, "Invert", 5), ImageOps.invert(pil)).max() == 0


@pytest.mark.parametrize("magnitude", [2.5, 5, 8, 10])
def test_posterize_solarize_match_pil(image, magnitude):
    pil = Image.fromarray(image)
    ra = RandAugment(1, magnitude)
    assert _diff(_ours(image, "Posterize", magnitude), ImageOps.posterize(pil, ra.argument("Posterize"))).max() == 0
    # TF's uint8 comparison wraps the threshold 256 (magnitude 10) to 0: everything is inverted
    ref = ImageOps.invert(pil) if magnitude == 10 else ImageOps.solarize(pil, ra.argument("Solarize"))
    assert _diff(_ours(image, "Solarize", magnitude), ref).max() == 0


def test_posterize_zero_bits_keeps_the_top_bit_like_tf(image):
    # magnitude 2 -> int(0.8) = 0 bits; TF clamps the uint8 shift of 8 to 7, i.e. 1 bit (PIL would give black)
    assert RandAugment(1, 2).argument("Posterize") == 0
    ref = ImageOps.posterize(Image.fromarray(image), 1)
    assert _diff(_ours(image, "Posterize", 2), ref).max() == 0


@pytest.mark.parametrize("magnitude", [3, 5, 10])
def test_solarize_add_matches_a_pil_point_table(image, magnitude):
    add = RandAugment(1, magnitude).argument("SolarizeAdd")
    table = [min(i + add, 255) if i < 128 else i for i in range(256)] * 3
    ref = Image.fromarray(image).point(table)
    assert _diff(_ours(image, "SolarizeAdd", magnitude), ref).max() == 0


@pytest.mark.parametrize("magnitude", [0, 2, 5, 8, 10])
def test_enhance_ops_match_pil(image, magnitude):
    pil = Image.fromarray(image)
    factor = RandAugment(1, magnitude).argument("Color")
    assert _diff(_ours(image, "Brightness", magnitude), ImageEnhance.Brightness(pil).enhance(factor)).max() == 0
    d = _diff(_ours(image, "Color", magnitude), ImageEnhance.Color(pil).enhance(factor))
    assert d.max() <= 1  # grey conversion rounding (see module docstring)
    d = _diff(_ours(image, "Contrast", magnitude, contrast_mean="pil"), ImageEnhance.Contrast(pil).enhance(factor))
    assert d.max() <= 1
    ours = _ours(image, "Sharpness", magnitude)
    d = _diff(ours, ImageEnhance.Sharpness(pil).enhance(factor))
    assert d.max() <= 1  # PIL rounds the smoothed image, TF truncates
    border = np.ones(image.shape[:2], bool)
    border[1:-1, 1:-1] = False
    assert _diff(ours[border], image[border]).max() == 0


def test_sharpness_degenerate_is_the_truncated_smooth_filter(image):
    # TF: SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior, truncated; borders keep the image.
    # TF's float32 sum lands one level below (or above) the exact integer sum / 13 on a few pixels
    from perceivers.data.transforms import _sharpen_degenerate

    deg = _sharpen_degenerate(torch.from_numpy(image)[None].float())[0].numpy()
    x = image.astype(np.int64)
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]])
    total = sum(k[i, j] * x[i : i + x.shape[0] - 2, j : j + x.shape[1] - 2] for i in range(3) for j in range(3))
    want = x.copy()
    want[1:-1, 1:-1] = total // 13
    assert _diff(deg, want).max() <= 1  # flat areas of 53 of the 256 levels come out one lower in TF
    pil_smooth = np.asarray(Image.fromarray(image).filter(ImageFilter.SMOOTH)).astype(np.int64)
    assert _diff(pil_smooth[1:-1, 1:-1], (2 * total + 13) // 26).max() == 0  # PIL rounds instead
    assert _diff(pil_smooth[0], image[0]).max() == 0


def test_tf_contrast_blends_from_pixel_count_over_256(image):
    h, w = image.shape[:2]
    for magnitude in (2, 8):
        factor = RandAugment(1, magnitude).argument("Contrast")
        grey = math.floor(min(h * w / 256, 255))
        want = np.floor(np.clip(grey + np.float32(factor) * (image.astype(np.float32) - grey), 0, 255))
        assert _diff(_ours(image, "Contrast", magnitude), want).max() <= 1


@pytest.mark.parametrize("magnitude", [2, 5, 8, 10])
@pytest.mark.parametrize("negate", [False, True])
def test_rotate_matches_pil_nearest(image, magnitude, negate):
    degrees = RandAugment(1, magnitude).argument("Rotate") * (-1 if negate else 1)
    ref = Image.fromarray(image).rotate(degrees, resample=Image.NEAREST, fillcolor=GREY)
    d = _diff(_ours(image, "Rotate", magnitude, negate=negate), ref)
    assert (d.max(-1) > 0).mean() <= 0.01  # only exact ties could round apart


@pytest.mark.parametrize("magnitude", [2, 5, 8, 10])
@pytest.mark.parametrize("op", ["ShearX", "ShearY"])
def test_shear_matches_pil_up_to_the_half_pixel_origin(image, magnitude, op):
    s = RandAugment(1, magnitude).argument(op)
    pil = Image.fromarray(image)
    plain = (1, s, 0, 0, 1, 0) if op == "ShearX" else (1, 0, 0, s, 1, 0)
    ours = _ours(image, op, magnitude)
    d = _diff(ours, pil.transform(pil.size, Image.AFFINE, plain, resample=Image.NEAREST, fillcolor=GREY))
    assert (d.max(-1) > 0).mean() <= 0.2  # shifted nearest pixel along a few diagonals
    # PIL samples at pixel centres (i + 0.5): moving its origin by -s/2 gives TF's pixel-index shear
    centred = (1, s, -s / 2, 0, 1, 0) if op == "ShearX" else (1, 0, 0, s, 1, -s / 2)
    d = _diff(ours, pil.transform(pil.size, Image.AFFINE, centred, resample=Image.NEAREST, fillcolor=GREY))
    assert (d.max(-1) > 0).mean() <= 0.06  # rows/columns where s·index is a tie (x.5) may round apart


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("op", ["TranslateX", "TranslateY"])
def test_translate_matches_pil(image, negate, op):
    ra = RandAugment(1, 3, translate_const=20)  # 6 pixels, as 100 would empty these tiny images
    t = ra.argument(op) * (-1 if negate else 1)
    pil = Image.fromarray(image)
    matrix = (1, 0, t, 0, 1, 0) if op == "TranslateX" else (1, 0, 0, 0, 1, t)
    ref = pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.NEAREST, fillcolor=GREY)
    assert _diff(_ours(image, op, 3, translate_const=20, negate=negate), ref).max() == 0


def test_cutout_matches_a_pil_rectangle(image):
    h, w = image.shape[:2]
    pad = RandAugment(1, 5, cutout_const=16).argument("Cutout")  # 8
    for cy, cx in [(0, 0), (h // 2, w // 3), (h - 1, w - 2)]:
        ref = Image.fromarray(image)
        ImageDraw.Draw(ref).rectangle(
            [max(cx - pad, 0), max(cy - pad, 0), min(cx + pad, w) - 1, min(cy + pad, h) - 1], fill=GREY
        )
        ours = _ours(image, "Cutout", 5, cutout_const=16, centers=torch.tensor([[cy, cx]]))
        assert _diff(ours, ref).max() == 0


# ---------------------------------------------------------------------------------- magnitude 0 and 5
def test_magnitude_zero_is_identity_for_geometric_cutout_and_solarize_add(image):
    x = torch.from_numpy(image)[None]
    ra = RandAugment(1, 0)
    for op in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd"):
        for negate in (False, True):
            assert torch.equal(ra.apply_op(x, op, negate=negate), x), op
    # TF's mappings are not identities at 0 for these: Solarize(0) inverts every pixel, enhance factor 0.1
    assert torch.equal(ra.apply_op(x, "Solarize"), 255 - x)


def test_enhance_ops_are_identity_at_magnitude_five(image):
    x = torch.from_numpy(image)[None]
    ra = RandAugment(1, 5)
    for op in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert torch.equal(ra.apply_op(x, op), x), op


# ---------------------------------------------------------------------------------- the random policy
def _batch(b: int = 12) -> torch.Tensor:
    return torch.from_numpy(np.stack([_natural_rgb(18, 16, seed=i) for i in range(b)]))


def test_same_generator_seed_same_result_and_other_seed_differs():
    x = _batch()
    ra = RandAugment(4, 5)
    a = ra(x, torch.Generator().manual_seed(7))
    b = ra(x, torch.Generator().manual_seed(7))
    c = ra(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_each_image_gets_its_own_op_always_applied():
    # replay the generator: per layer the op indices [B], the signs [B], then cutout rows and columns [B]
    x = _batch(32)
    ra = RandAugment(1, 7)
    out = ra(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    choice = torch.randint(16, (32,), generator=g)
    negate = torch.rand(32, generator=g) < 0.5
    centers = torch.stack([torch.randint(18, (32,), generator=g), torch.randint(16, (32,), generator=g)], 1)
    assert len(set(choice.tolist())) > 8  # many different ops in one batch
    for i in range(32):
        op = RANDAUGMENT_OPS[int(choice[i])]
        want = ra.apply_op(x[i : i + 1], op, negate=bool(negate[i]), centers=centers[i : i + 1])
        assert torch.equal(out[i : i + 1], want), op


def test_one_image_applies_its_layers_in_turn():
    # one image skips the per-op selection: the same draws, the ops applied one after another
    x = _batch(1)
    for seed in range(6):
        ra = RandAugment(4, 5 + seed % 3)
        out = ra(x, torch.Generator().manual_seed(seed))
        g, want = torch.Generator().manual_seed(seed), x
        for _ in range(4):
            op = RANDAUGMENT_OPS[int(torch.randint(16, (1,), generator=g))]
            negate = torch.rand(1, generator=g) < 0.5
            centers = torch.stack([torch.randint(18, (1,), generator=g), torch.randint(16, (1,), generator=g)], 1)
            want = ra.apply_op(want, op, negate=negate, centers=centers)
        assert torch.equal(out, want)


def test_identical_images_are_augmented_independently():
    x = _batch(1).expand(16, -1, -1, -1).contiguous()
    out = RandAugment(2, 9)(x, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) >= 10


def test_shape_dtype_and_float_range_are_kept():
    x = _batch(6)
    ra = RandAugment(3, 9)
    out = ra(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    xf = x.float() / 255
    outf = ra(xf, torch.Generator().manual_seed(0))
    assert outf.dtype == torch.float32 and outf.shape == x.shape
    torch.testing.assert_close(outf * 255, out.float(), atol=1e-3, rtol=0)  # same ops on the same levels
    grey = x[..., :1]
    assert ra(grey, torch.Generator().manual_seed(0)).shape == grey.shape
    assert torch.equal(RandAugment(0, 5)(x), x)


def test_image_augment_uses_randaugment_after_the_crop():
    aug = ImageAugment(flip=False, crop_scale=None, randaugment_layers=2, randaugment_magnitude=9)
    x = _batch(4)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x.shape
    levels = out * 255
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # RandAugment's uint8 grid
    with pytest.raises(ValueError, match="magnitude"):
        ImageAugment(randaugment_layers=2, randaugment_magnitude=11)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_layers": -1}, "num_layers"),
        ({"num_layers": 1.5}, "num_layers"),
        ({"num_layers": True}, "num_layers"),
        ({"magnitude": -0.5}, "magnitude"),
        ({"magnitude": 10.5}, "magnitude"),
        ({"magnitude": float("nan")}, "magnitude"),
        ({"magnitude": "5"}, "magnitude"),
        ({"contrast_mean": "mean"}, "contrast_mean"),
        ({"fill": 300}, "fill"),
        ({"translate_const": -1}, "translate_const"),
    ],
)
def test_bad_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandAugment(**kwargs)


def test_bad_inputs_raise():
    ra = RandAugment(1, 5)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ra(torch.zeros(2, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        ra(torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        ra(torch.zeros(1, 4, 4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        ra.apply_op(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), "Blur")
