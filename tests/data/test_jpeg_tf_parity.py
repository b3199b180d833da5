"""JPEG decoding against TensorFlow's, byte for byte: ``decode_jpeg`` / ``decode_and_crop_jpeg`` (channels=3).

``jpeg_tf_reference.npz`` holds 16 small JPEG files (4:2:0, 4:2:2, 4:4:4, 4:4:0, 4:1:1, progressive, restart
markers, grey, CMYK with and without an Adobe marker, an EXIF orientation tag, junk before the end marker, odd
and tiny sizes), TF's full decode and TF's cropped decode for 434 windows, recorded by
``scripts/make_jpeg_tf_reference.py`` (needs TensorFlow; not run here). No tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from perceivers.data import ImageNetEvalTransform, ImageNetTrainTransform
from perceivers.data.image import (
    _normalized_chw,
    center_crop_box,
    load_image,
    load_window,
    resize_bicubic,
)
from perceivers.data.jpeg import decode_jpeg, jpeg_info
from perceivers.data.transforms import sample_crop_boxes

pytest.importorskip("simplejpeg")
REFERENCE = np.load(Path(__file__).with_name("jpeg_tf_reference.npz"))
NAMES = sorted({k.split("/")[0] for k in REFERENCE.files})


def _case(name: str) -> tuple[bytes, np.ndarray, list[tuple[tuple[int, int, int, int], np.ndarray]]]:
    """The file's bytes, TF's full decode and (window, TF's cropped decode) pairs."""
    data = REFERENCE[f"{name}/jpeg"].tobytes()
    full = REFERENCE[f"{name}/full"]
    deltas = REFERENCE[f"{name}/crop_minus_cut"]
    crops, at = [], 0
    for top, left, height, width in REFERENCE[f"{name}/windows"].tolist():
        size = height * width * 3
        delta = deltas[at : at + size].reshape(height, width, 3)
        crops.append(((top, left, height, width), (full[top : top + height, left : left + width] + delta).astype(np.uint8)))
        at += size
    assert at == deltas.size
    return data, full, crops


def _diff(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(np.int64) - b)
    return f"{int((d > 0).any(-1).sum())} pixels differ, by up to {d.max()}"


def test_reference_covers_the_layouts():
    assert len(NAMES) == 16
    sampling = {jpeg_info(REFERENCE[f"{n}/jpeg"].tobytes()).sampling for n in NAMES}
    assert {((2, 2), (1, 1), (1, 1)), ((2, 1), (1, 1), (1, 1)), ((1, 1), (1, 1), (1, 1)), ((1, 2), (1, 1), (1, 1)),
            ((4, 1), (1, 1), (1, 1)), ((1, 1),), ((1, 1),) * 4} <= sampling


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_tensorflow(name):
    data, full, crops = _case(name)
    ours = decode_jpeg(data)
    assert ours.shape == full.shape and np.array_equal(ours, full), f"{name}: {_diff(ours, full)}"
    for window, want in crops:
        got = decode_jpeg(data, window)
        assert got.shape == want.shape and np.array_equal(got, want), f"{name} {window}: {_diff(got, want)}"


def test_cropped_decode_is_not_the_cut_full_decode():
    """The recorded windows meet libjpeg-turbo's strip upsampling: with 4:2:0 / 4:2:2 chroma TF's cropped decode
    differs from the cut full decode in a crop's first or last column (by up to 22 levels on the photographs,
    81 on the sharp digits); with 4:4:4 it
    does not."""
    differ = {}
    for name in NAMES:
        _, full, crops = _case(name)
        differ[name] = [w for w, crop in crops if not np.array_equal(crop, full[w[0] : w[0] + w[2], w[1] : w[1] + w[3]])]
    assert len(differ["digits_420_q95_47x71"]) >= 10 and len(differ["flower_422_q95_40x64"]) >= 10
    assert not differ["china_444_q90_33x47"] and not differ["china_grey_q90_30x44"]


def test_pillow_decodes_differently(tmp_path):
    """Pillow's accurate DCT is what the fast DCT replaces (levels off on most pixels)."""
    data, full, _ = _case("flower_422_q95_40x64")
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    pillow = load_image(path)
    assert (np.abs(pillow.astype(int) - full) > 0).mean() > 0.3


def test_exif_orientation_is_ignored():
    data, full, _ = _case("china_420_exif_orientation6_30x40")
    assert full.shape == (30, 40, 3) and decode_jpeg(data).shape == (30, 40, 3)


def test_truncated_and_bad_windows_raise():
    data, _, _ = _case("flower_422_q95_40x64")
    with pytest.raises(ValueError, match="truncated"):
        decode_jpeg(data[: len(data) // 2])
    with pytest.raises(ValueError, match="inside"):
        decode_jpeg(data, (0, 60, 10, 10))
    with pytest.raises(ValueError, match="not a JPEG"):
        decode_jpeg(b"\x89PNG\r\n\x1a\n")


def test_load_window_decodes_files_as_tensorflow(tmp_path):
    data, _, crops = _case("digits_420_q95_47x71")
    path = tmp_path / "digits.jpg"
    path.write_bytes(data)
    for window, want in crops[:8]:
        assert np.array_equal(load_window(path, lambda h, w, box=window: box), want)
        pil = load_window(path, lambda h, w, box=window: box, decoder="pil")
        top, left, height, width = window
        assert np.array_equal(pil, load_image(path)[top : top + height, left : left + width])
    with pytest.raises(ValueError, match="decoder"):
        load_window(path, lambda h, w: (0, 0, 1, 1), decoder="cv2")


def test_png_files_fall_back_to_pillow(tmp_path):
    from PIL import Image

    _, full, _ = _case("china_444_q90_33x47")
    path = tmp_path / "a.png"
    Image.fromarray(full).save(path)
    assert np.array_equal(load_window(path, lambda h, w: (1, 2, h - 1, w - 2)), full[1:, 2:])


def test_transforms_decode_the_official_windows(tmp_path):
    """The eval transform decodes the 224/256 centre window, the training transform the drawn box, as
    decode_and_crop_jpeg; the draws are made on the header's size (DeepMind: extract_jpeg_shape)."""
    data, _, _ = _case("flower_422_q95_40x64")
    path = tmp_path / "flower.jpg"
    path.write_bytes(data)
    top, left, side = center_crop_box(40, 64, 16)
    want = _normalized_chw(resize_bicubic(decode_jpeg(data, (top, left, side, side)), (16, 16)),
                           ImageNetEvalTransform.mean, ImageNetEvalTransform.std)
    assert torch.equal(ImageNetEvalTransform(16)(path), want)
    transform = ImageNetTrainTransform(16, flip=False, randaugment_layers=0)
    for seed in range(5):
        box = sample_crop_boxes(1, 40, 64, output_size=16, generator=torch.Generator().manual_seed(seed))[0].tolist()
        assert np.array_equal(transform.crop(path, torch.Generator().manual_seed(seed)), decode_jpeg(data, box))
