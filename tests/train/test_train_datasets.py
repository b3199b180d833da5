"""Dataset readers on small files written in the real formats, and their errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from train_files import write_image_folder

from perceivers.data import ByteTokenizer
from perceivers.data.datasets import (
    ArrayDataset,
    ByteChunkDataset,
    DataError,
    ImageFolderDataset,
    TextFolderDataset,
    check_labels,
    collate_tokens,
    load_digits,
    mask_tokens,
    read_cifar,
    split_indices,
)


def test_digits_is_bundled():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and set(labels.tolist()) == set(range(10))


def test_cifar10_reads_pickles_channels_last(cifar10_dir: Path):
    images, labels, names = read_cifar(cifar10_dir.parent, train=True)
    assert images.shape == (30, 32, 32, 3) and images.dtype == torch.uint8 and labels.shape == (30,)
    assert names[:2] == ["class0", "class1"]
    # pixel (row 0, col 1) of image 0: channel-planar layout in the file
    with (cifar10_dir / "data_batch_1").open("rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    assert images[0, 0, 1].tolist() == [raw[1], raw[1024 + 1], raw[2048 + 1]]
    test_images, _, _ = read_cifar(cifar10_dir, train=False, variant="cifar10")
    assert test_images.shape[0] == 6


def test_cifar100_fine_and_coarse(cifar100_dir: Path):
    _, fine, names = read_cifar(cifar100_dir, train=True)
    _, coarse, coarse_names = read_cifar(cifar100_dir, train=True, coarse=True)
    assert len(names) == 100 and len(coarse_names) == 20
    assert torch.equal(coarse, fine // 5)


def test_cifar_errors(tmp_path: Path, cifar10_dir: Path):
    with pytest.raises(DataError, match="does not exist"):
        read_cifar(tmp_path / "nope", train=True)
    with pytest.raises(DataError, match="no CIFAR python-pickle files"):
        read_cifar(tmp_path, train=True, variant="cifar100")
    (cifar10_dir / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar(cifar10_dir, train=True)


def test_cifar_labels_out_of_range(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, f, protocol=2)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 10\).*12"):
        read_cifar(tmp_path, train=True)


@pytest.mark.parametrize("labels", [["cat", "dog"], [0.7, 1.7]])
def test_cifar_labels_must_be_integers(tmp_path: Path, labels):
    """String labels failed inside numpy; float labels were truncated (1.7 became class 1) and trained."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, f, protocol=2)
    with pytest.raises(DataError, match="'labels' must be integer class ids"):
        read_cifar(tmp_path, train=True)


def test_image_folder_reads_and_resizes(image_dir: Path):
    ds = ImageFolderDataset(image_dir, 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 8
    item = ds[3]
    assert item["inputs"].shape == (16, 16, 3) and item["inputs"].dtype == torch.uint8
    assert ds.targets.tolist() == [0] * 4 + [1] * 4
    grey = ImageFolderDataset(image_dir, (5, 7), channels=1, center_crop=True)
    assert grey[0]["inputs"].shape == (5, 7, 1)


def test_image_folder_errors(tmp_path: Path, image_dir: Path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat", 8)
    (image_dir / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(image_dir, 8)


def test_image_folder_class_order_from_training(tmp_path: Path):
    write_image_folder(tmp_path / "test", classes=("dog",), per_class=1)
    ds = ImageFolderDataset(tmp_path / "test", 8, classes=["cat", "dog"])
    assert ds[0]["target"].item() == 1
    with pytest.raises(DataError, match="not in"):
        ImageFolderDataset(tmp_path / "test", 8, classes=["cat"])


def test_byte_chunks_cover_text_and_pad(text_dir: Path):
    ds = ByteChunkDataset.from_files(text_dir, seq_len=64)
    tok = ByteTokenizer()
    text = "".join((p.read_text(encoding="utf-8") + "\n") for p in sorted(text_dir.glob("*.txt")))
    ids = torch.cat([ds[i]["inputs"][ds[i]["mask"]] for i in range(len(ds))])
    assert tok.decode(ids) == text
    last = ds[len(ds) - 1]
    assert not last["mask"].all() and (last["inputs"][~last["mask"]] == 0).all()


def test_text_files_errors(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        ByteChunkDataset.from_files(tmp_path / "none.txt", 16)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(DataError, match="not valid UTF-8"):
        ByteChunkDataset.from_files(bad, 16)
    with pytest.raises(DataError, match="matches no files"):
        ByteChunkDataset.from_files(str(tmp_path / "*.md"), 16)


def test_relative_text_paths_name_the_working_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"relative to the working directory {tmp_path}"):
        ByteChunkDataset.from_files("README.md", 16)
    with pytest.raises(DataError, match=f"matches no files in the working directory {tmp_path}"):
        ByteChunkDataset.from_files("docs/*.md", 16)


def test_text_folder_classification(tmp_path: Path):
    for label, words in (("neg", "bad awful"), ("pos", "good great")):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.txt").write_text(f"{words} {'!' * i}")
    ds = TextFolderDataset(tmp_path, max_length=6)
    assert ds.classes == ["neg", "pos"] and len(ds) == 6
    batch = collate_tokens([ds[0], ds[5]])
    assert batch["inputs"].shape == batch["mask"].shape and batch["target"].tolist() == [0, 1]
    assert batch["inputs"].shape[1] <= 6


def test_an_empty_text_file_is_refused(tmp_path: Path):
    """An empty file was read as one padding token that the mask counted as text."""
    for label in ("neg", "pos"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.txt").write_text("some text")
    (tmp_path / "pos" / "b.txt").write_text("")
    with pytest.raises(DataError, match=r"b\.txt' is empty"):
        TextFolderDataset(tmp_path, max_length=6)


def test_mask_tokens_bert_style():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 262, (8, 200), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 150:] = False
    corrupted, labels = mask_tokens(ids, mask, mask_prob=0.15, generator=gen)
    chosen = labels != -100
    assert not chosen[:, 150:].any() and (labels[chosen] == ids[chosen]).all()
    share = chosen[:, :150].float().mean().item()
    assert 0.1 < share < 0.2
    masked = (corrupted == 3) & chosen
    assert 0.7 < masked.sum() / chosen.sum() < 0.9
    assert (corrupted[~chosen] == ids[~chosen]).all()


def test_arrays_and_labels():
    ds = ArrayDataset(np.zeros((4, 3, 2), np.float32), np.array([0, 1, 2, 1]))
    assert ds[1]["inputs"].shape == (3, 2) and ds[1]["target"].item() == 1
    with pytest.raises(DataError, match="4 inputs but targets"):
        ArrayDataset(torch.zeros(4, 2), torch.zeros(3))
    assert check_labels(torch.tensor([0, 3]), None, "x") == 4
    with pytest.raises(DataError, match="out of range"):
        check_labels(torch.tensor([0, 3]), 3, "x")
    with pytest.raises(DataError, match="integer class ids"):
        check_labels(torch.tensor([0.5]), 3, "x")


def test_split_indices_is_a_seeded_partition():
    rest, a, b = split_indices(100, [0.1, 0.2], seed=3)
    assert (len(rest), len(a), len(b)) == (70, 10, 20)
    assert sorted(torch.cat([rest, a, b]).tolist()) == list(range(100))
    assert torch.equal(split_indices(100, [0.1, 0.2], seed=3)[1], a)
