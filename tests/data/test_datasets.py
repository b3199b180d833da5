"""perceivers.data.datasets: pixel values and bytes as the files hold them (readers' errors: tests/train)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceivers.data.datasets import DataError, ImageFolderDataset, read_cifar


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_scales_sixteen_bit_files(tmp_path: Path, channels):
    """PIL's convert clips 16-bit greyscale at 255: levels 0..63000 read as 98 % white pixels."""
    grey16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(grey16).save(tmp_path / name / "x.png")
    item = ImageFolderDataset(tmp_path, 8, channels=channels)[0]["inputs"].numpy()
    assert item.shape == (8, 8, channels)
    expected = np.rint(grey16 / 257).astype(np.uint8)
    for c in range(channels):
        np.testing.assert_array_equal(item[..., c], expected)


@pytest.mark.parametrize("data", [np.full((2, 3072), 300, np.int64), np.full((2, 3072), 0.7, np.float32),
                                  np.full((2, 3072), -1, np.int16)])
def test_cifar_pixels_outside_uint8_are_refused(tmp_path: Path, data):
    """The uint8 cast wrapped 300 to 44 and truncated 0.7 to 0 without a word."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=rf"'data' must hold uint8 pixel values 0..255, got dtype {data.dtype}"):
        read_cifar(tmp_path, train=True)


def test_cifar_integer_pixels_in_range_are_read(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": [0, 1]}, f, protocol=2)
    images, _, _ = read_cifar(tmp_path, train=True)
    np.testing.assert_array_equal(images[0].numpy(), data[0].reshape(3, 32, 32).transpose(1, 2, 0))
