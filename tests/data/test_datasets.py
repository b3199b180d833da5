"""perceivers.data.datasets: pixel values and bytes as the files hold them (readers' errors: tests/train)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceivers.data.datasets import ImageFolderDataset


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
