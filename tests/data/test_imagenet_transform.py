"""ImageNet eval preprocessing: official crop/resize arithmetic, transformers parity, class names."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from perceivers.data import IMAGENET_MEAN, IMAGENET_STD, ImageNetEvalTransform, imagenet_class_names
from perceivers.data.image import center_crop_box, resize_bicubic


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_center_crop_box_matches_official_formula():
    # side = int(224/256 * shorter side); offsets round up: ((H - s) + 1) // 2
    assert center_crop_box(256, 256) == (16, 16, 224)
    assert center_crop_box(257, 400) == (17, 88, 224)  # (33 + 1) // 2 = 17; transformers takes 16
    assert center_crop_box(375, 500) == (24, 86, 328)
    assert center_crop_box(500, 375) == (86, 24, 328)


def test_tf_bicubic_half_scale_downsample_is_keys_kernel():
    # 448 -> 224: every output sits half-way between two inputs; Keys(a=-0.5) weights (-1/16, 9/16, 9/16, -1/16)
    img = _image(448, 8, seed=1)
    got = resize_bicubic(img, (224, 8), "tf")
    src = img.astype(np.float64)
    o = np.arange(1, 223)
    want = -src[2 * o - 1] / 16 + 9 * src[2 * o] / 16 + 9 * src[2 * o + 1] / 16 - src[2 * o + 2] / 16
    # columns: 8 -> 8 is the identity
    np.testing.assert_allclose(got[1:223], want, atol=1e-4)
    # first row: the tap at -1 falls outside, the other three are renormalised
    w = np.array([9, 9, -1]) / 17
    np.testing.assert_allclose(got[0], np.tensordot(w, src[:3], axes=1), atol=1e-4)


def test_tf_bicubic_upsample_equals_pil_float_when_offsets_are_exact():
    # 112 -> 224 puts samples at offsets 0.25/0.75 (exact in TF's 1/1024 table); PIL's float-mode bicubic
    # (a = -0.5, half-pixel centres, no antialias when enlarging, edge taps renormalised) is the same filter.
    img = _image(112, 96, seed=2)
    got = resize_bicubic(img, (224, 192), "tf")
    for c in range(3):
        ref = np.asarray(Image.fromarray(img[:, :, c].astype(np.float32), mode="F").resize((192, 224), Image.BICUBIC))
        np.testing.assert_allclose(got[:, :, c], ref, atol=2e-3)


def test_tf_bicubic_is_unclamped_and_identity_at_same_size():
    img = _image(40, 40, seed=3)
    np.testing.assert_allclose(resize_bicubic(img, (40, 40), "tf"), img.astype(np.float32), atol=1e-4)
    edge = np.zeros((16, 16, 3), np.uint8)
    edge[:, 8:] = 255
    out = resize_bicubic(edge, (37, 37), "tf")
    assert out.min() < 0 and out.max() > 255  # overshoot is kept, as in tf.image.resize


def test_transform_output_layout_and_normalisation():
    img = np.full((300, 400, 3), (10, 128, 250), dtype=np.uint8)
    x = ImageNetEvalTransform()(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    want = (np.array([10, 128, 250]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.mean(dim=(1, 2)).numpy(), want, atol=1e-4)
    assert ImageNetEvalTransform().batch([img, Image.fromarray(img)]).shape == (2, 3, 224, 224)


@pytest.mark.parametrize("shape", [(300, 400), (480, 352), (256, 256), (208, 600)])
def test_parity_with_transformers_pil_processor(shape):
    """Tolerance 1e-5: both resize with PIL on uint8; only the float normalisation order differs."""
    transformers = pytest.importorskip("transformers")
    img = _image(*shape, seed=sum(shape))
    _, _, side = center_crop_box(*shape)
    # transformers rounds the crop offset down; these shapes leave an even margin so both agree
    assert (shape[0] - side) % 2 == 0 and (shape[1] - side) % 2 == 0
    ref = transformers.PerceiverImageProcessorPil()(Image.fromarray(img), return_tensors="pt")["pixel_values"]
    got = ImageNetEvalTransform(resample="pil").batch([img])
    assert got.shape == ref.shape == (1, 3, 224, 224)
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=0)


def test_official_resample_differs_from_transformers_by_resampler_only():
    transformers = pytest.importorskip("transformers")
    img = np.asarray(Image.fromarray(_image(30, 40, seed=5)).resize((400, 300), Image.BILINEAR))  # smooth
    ref = transformers.PerceiverImageProcessorPil()(Image.fromarray(img), return_tensors="pt")["pixel_values"]
    got = ImageNetEvalTransform(resample="tf").batch([img])
    # smooth content: TF (no antialias) and PIL (antialias) bicubic agree to a small fraction of a std
    assert (got - ref).abs().mean() < 0.02


def test_class_names_standard_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet tissue"
    assert names[207] == "golden retriever" and names[281] == "tabby" and names[954] == "banana"
    assert names[134] == names[517] == "crane" and names[638] == names[639] == "maillot"


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit greyscale PNG reads as the same picture as its 8-bit version (PIL's RGB conversion clips it at 255:
    almost white); float images, which have no standard range, are refused."""
    from perceivers.data import load_image

    grey8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (5, 1))  # [5, 64]
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "g16.png"), load_image(tmp_path / "g8.png"))
    np.testing.assert_array_equal(load_image(Image.open(tmp_path / "g16.png")), np.repeat(grey8[:, :, None], 3, 2))
    Image.fromarray(grey8.astype(np.float32) / 255).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"f.tiff is a float image \(PIL mode F\)"):
        load_image(tmp_path / "f.tiff")


def test_sixteen_bit_and_single_channel_arrays_read_as_their_files_do(tmp_path):
    """A uint16 array (imageio / OpenCV's reading of a 16-bit file) is scaled like the 16-bit file itself, not
    clipped at 255 (an all-white picture); a grey ``[H, W, 1]`` array reads like ``[H, W]``."""
    from perceivers.data import load_image

    grey8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (5, 1))  # [5, 64]
    grey16 = grey8.astype(np.uint16) * 257
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    expected = np.repeat(grey8[:, :, None], 3, 2)
    np.testing.assert_array_equal(load_image(np.repeat(grey16[:, :, None], 3, 2)), expected)
    np.testing.assert_array_equal(load_image(grey16), load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(load_image(torch.from_numpy(grey16.astype(np.int32))[..., None] // 257), expected)
    np.testing.assert_array_equal(load_image(grey8[:, :, None]), expected)


def test_too_small_to_crop_names_the_smallest_side():
    with pytest.raises(ValueError, match=r"image of 1×300 is too small to crop: .* at least 2 pixels"):
        ImageNetEvalTransform()(np.zeros((1, 300, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        center_crop_box(3, 3, size=2, crop_padding=30)
    assert center_crop_box(2, 2) == (1, 1, 1)


def test_float_arrays_in_the_unit_range_warn_that_they_read_as_0_to_255():
    """Float arrays are read as 0..255, as transformers' processors read them; one within [0, 1] (a ToTensor-style
    image) would come out almost black, so it warns."""
    from perceivers.data import load_image

    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 2, 3)
    with pytest.warns(UserWarning, match=r"values in \[0, 1\] \(max 1\) is read as 0\.\.255"):
        assert load_image(unit).max() == 1
    with pytest.warns(UserWarning, match="almost black"):
        ImageNetEvalTransform(size=8, crop_padding=0)(torch.rand(8, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load_image(unit * 255), np.rint(unit * 255).astype(np.uint8))
        load_image(np.zeros((2, 2, 3), np.float32))  # black is black in either range
        load_image((unit * 255).astype(np.uint8))
