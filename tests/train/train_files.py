"""Writers of small datasets in the real on-disk formats (CIFAR python pickles, image folders, text files)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` as the official archive lays it out (Python-2 pickles, bytes keys)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_vis": 3072}
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine.tolist(),
                 b"coarse_labels": (fine // 5).tolist(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    with (folder / "meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size=(10, 12), seed: int = 0) -> Path:
    """PNG and JPEG files, one folder per class, in assorted sizes and modes (RGB, L, RGBA)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    modes = ("RGB", "L", "RGBA")
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = size[0] + i, size[1] + 2 * i
            mode = modes[(i + c) % 3]
            channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
            img = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
            suffix = ".jpg" if mode == "RGB" and i % 2 else ".png"
            img.save(root / name / f"{i}{suffix}")
    return root
