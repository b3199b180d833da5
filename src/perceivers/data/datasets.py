"""Datasets for training: scikit-learn's digits, CIFAR-10/100 (python pickles), image folders, text files
(byte-level masked LM and classification) and in-memory arrays.

Items are dicts of tensors. Images are **channels last** ``[H, W, C]`` (uint8 ``[0, 255]`` when read
from files, float32 ``[0, 1]`` for digits); batched augmentation and normalisation live in
:mod:`perceivers.data.transforms`. Text is encoded with :class:`perceivers.data.ByteTokenizer`.

Every reader checks what it was given and raises :class:`DataError` (a ``ValueError``) naming the path,
the value and what was expected, so a bad dataset stops a run before training starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..safe_files import load_numpy_pickle
from .image import _rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "ByteChunkDataset",
    "DataError",
    "ImageFolderDataset",
    "TextFolderDataset",
    "check_labels",
    "cifar_has_test",
    "collate_tokens",
    "find_text_files",
    "load_digits",
    "mask_tokens",
    "read_cifar",
    "split_indices",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset that cannot be used as configured (missing path, unreadable file, bad labels or shapes)."""


# ----------------------------------------------------------------------------------------------- helpers


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        return torch.as_tensor(np.asarray(value))
    raise DataError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def check_labels(labels: Tensor, num_classes: int | None, source: str) -> int:
    """Check integer class ids lie in ``[0, num_classes)`` and return the number of classes.

    ``num_classes=None`` infers ``max + 1``. Raises :class:`DataError` naming ``source`` otherwise.
    """
    if labels.ndim != 1:
        raise DataError(f"{source}: labels must be one class id per sample [N], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"{source}: labels must be integer class ids, got dtype {labels.dtype}")
    if labels.numel() == 0:
        raise DataError(f"{source}: no samples")
    low, high = int(labels.min()), int(labels.max())
    if num_classes is None:
        num_classes = high + 1
    if low < 0 or high >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(
            f"{source}: labels must lie in [0, {num_classes}) (num_classes={num_classes}), found "
            f"{bad.numel()} out of range, e.g. {bad[:5].tolist()}"
        )
    return num_classes


def split_indices(n: int, fractions: Sequence[float], seed: int = 0) -> list[Tensor]:
    """A seeded random partition of ``range(n)``: one index tensor per fraction plus the remainder first.

    ``split_indices(100, [0.1, 0.2])`` → ``[rest (70), first fraction (10), second (20)]``.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise DataError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [round(f * n) for f in fractions]
    parts, start = [], 0
    for size in sizes:
        parts.append(perm[start:start + size])
        start += size
    return [perm[start:], *parts]


# ----------------------------------------------------------------------------------------------- arrays


class ArrayDataset(Dataset):
    """In-memory samples: ``inputs [N, ...]`` with ``targets [N, ...]`` and an optional ``mask [N, ...]``.

    Accepts torch tensors or numpy arrays (shared, not copied, where possible). Items are
    ``{"inputs", "target"[, "mask"]}``.
    """

    def __init__(self, inputs: Any, targets: Any, mask: Any | None = None, *, name: str = "arrays") -> None:
        self.inputs = _as_tensor(inputs, f"{name} inputs")
        self.targets = _as_tensor(targets, f"{name} targets")
        self.mask = None if mask is None else _as_tensor(mask, f"{name} mask").bool()
        n = self.inputs.shape[0] if self.inputs.ndim else 0
        if n == 0:
            raise DataError(f"{name}: inputs are empty (shape {tuple(self.inputs.shape)})")
        if self.targets.shape[:1] != (n,):
            raise DataError(f"{name}: {n} inputs but targets have shape {tuple(self.targets.shape)}")
        if self.mask is not None and self.mask.shape[:1] != (n,):
            raise DataError(f"{name}: {n} inputs but mask has shape {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"inputs": self.inputs[index], "target": self.targets[index]}
        if self.mask is not None:
            item["mask"] = self.mask[index]
        return item


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits (1797 samples, no download).

    Returns:
        images float32 ``[1797, 8, 8, 1]`` in ``[0, 1]`` and labels int64 ``[1797]`` (0–9).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    digits = sk_load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0)[..., None]
    return images, torch.tensor(digits.target, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------- CIFAR

_CIFAR_LAYOUT = {
    # variant: (folder name, train files, test files, label key, meta file, names key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}


def _cifar_dir(root: Path, variant: str | None) -> tuple[Path, str]:
    if not root.exists():
        raise DataError(f"CIFAR folder {str(root)!r} does not exist")
    candidates = [variant] if variant else list(_CIFAR_LAYOUT)
    for name in candidates:
        if name not in _CIFAR_LAYOUT:
            raise DataError(f"CIFAR variant must be 'cifar10' or 'cifar100', got {name!r}")
        folder, train_files = _CIFAR_LAYOUT[name][:2]
        for path in (root, root / folder):
            if (path / train_files[0]).is_file():
                return path, name
    expected = " or ".join(f"{_CIFAR_LAYOUT[n][0]}/{_CIFAR_LAYOUT[n][1][0]}" for n in candidates)
    raise DataError(f"{str(root)!r} holds no CIFAR python-pickle files: expected {expected} (in or under it)")


def cifar_has_test(root: str | Path, variant: str | None = None) -> bool:
    """Whether the CIFAR folder under ``root`` holds its test file."""
    folder, variant = _cifar_dir(Path(root), variant)
    return all((folder / name).is_file() for name in _CIFAR_LAYOUT[variant][2])


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"CIFAR file {str(path)!r} is missing")
    try:
        with path.open("rb") as f:
            data = load_numpy_pickle(f, encoding="bytes")  # Python 2 pickles; nothing but arrays may load
    except Exception as err:
        raise DataError(f"cannot read CIFAR file {str(path)!r}: {type(err).__name__}: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"CIFAR file {str(path)!r} does not hold a dict (got {type(data).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def read_cifar(
    root: str | Path, *, train: bool, variant: str | None = None, coarse: bool = False
) -> tuple[Tensor, Tensor, list[str]]:
    """Read CIFAR-10 or CIFAR-100 from the official python-pickle folders.

    Args:
        root: ``cifar-10-batches-py`` / ``cifar-100-python`` or a folder that contains one of them.
        train: the training files (else the test file).
        variant: ``"cifar10"``, ``"cifar100"`` or None (detect).
        coarse: CIFAR-100's 20 superclass labels instead of the 100 fine ones.

    Returns:
        images uint8 ``[N, 32, 32, 3]`` (channels last), labels int64 ``[N]``, class names.
    """
    folder, variant = _cifar_dir(Path(root), variant)
    _, train_files, test_files, label_key, meta_file, names_key = _CIFAR_LAYOUT[variant]
    if coarse:
        if variant != "cifar100":
            raise DataError("coarse labels exist only for CIFAR-100")
        label_key, names_key = "coarse_labels", "coarse_label_names"
    images, labels = [], []
    for name in train_files if train else test_files:
        batch = _unpickle(folder / name)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"CIFAR file {str(folder / name)!r} lacks 'data' or {label_key!r} (keys: {sorted(batch)})")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8:  # a cast would wrap 300 to 44 and truncate 0.7 to 0
            if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
                low, high = (data.min(), data.max()) if data.size and data.dtype.kind in "iuf" else ("?", "?")
                raise DataError(f"CIFAR file {str(folder / name)!r}: 'data' must hold uint8 pixel values 0..255, "
                                f"got dtype {data.dtype} with values in [{low}, {high}]")
            data = data.astype(np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"CIFAR file {str(folder / name)!r}: 'data' must be [N, 3072] uint8, got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        raw = np.asarray(batch[label_key])
        if raw.dtype.kind not in "iu":
            raise DataError(f"CIFAR file {str(folder / name)!r}: {label_key!r} must be integer class ids, got "
                            f"{raw.dtype} (first values: {raw.ravel()[:3].tolist()})")
        labels.append(raw.astype(np.int64))
        if len(labels[-1]) != len(data):
            raise DataError(f"CIFAR file {str(folder / name)!r}: {len(data)} images but {len(labels[-1])} labels")
    num_classes = 100 if variant == "cifar100" and not coarse else (20 if coarse else 10)
    names = [f"class_{i}" for i in range(num_classes)]
    meta_path = folder / meta_file
    if meta_path.is_file():
        meta = _unpickle(meta_path)
        if names_key in meta:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    label_tensor = torch.from_numpy(np.concatenate(labels))
    check_labels(label_tensor, num_classes, f"CIFAR ({variant}) in {str(folder)!r}")
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(images))), label_tensor, names


# ----------------------------------------------------------------------------------------------- image folders


def _class_folders(root: Path, kind: str) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{kind} folder {str(root)!r} does not exist or is not a directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{kind} folder {str(root)!r} has no class sub-folders (expected one folder per class)")
    return classes


class ImageFolderDataset(Dataset):
    """Images stored one folder per class: ``root/<class>/<image>``; classes sorted by name.

    Every file's header is read at construction (cheap), so an unreadable or truncated-header file
    fails here, naming the file, rather than mid-training. Items are ``{"inputs": uint8 [H, W, C],
    "target": int64}``, each image converted to RGB (``channels=3``) or greyscale (1) (16-bit files scaled
    from [0, 65535], as :func:`~perceivers.data.load_image` reads them) and resized to
    ``image_size`` (bilinear with antialiasing; aspect ratio not kept unless ``center_crop``).

    Args:
        classes: class names fixing the label order (e.g. those of the training folder for a test folder).
        center_crop: crop the largest central square before resizing.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | Sequence[int],
        *,
        channels: int = 3,
        classes: Sequence[str] | None = None,
        center_crop: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = True,
    ) -> None:
        from PIL import Image

        self.root = Path(root)
        folders = _class_folders(self.root, "image")
        names = [p.name for p in folders]
        if classes is not None:
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise DataError(f"image folder {str(self.root)!r} has classes {unknown} not in {list(classes)}")
            names = list(classes)
        self.classes = names
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        self.channels, self.center_crop = channels, center_crop
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.suffix.lower() in exts:
                    self.samples.append((path, label))
        if not self.samples:
            raise DataError(f"image folder {str(self.root)!r} has no images with extensions {list(exts)}")
        if verify:
            for path, _ in self.samples:
                try:
                    with Image.open(path) as img:
                        img.size  # noqa: B018 - reading the header is the check
                except Exception as err:
                    raise DataError(f"cannot read image {str(path)!r}: {type(err).__name__}: {err}") from err

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def load(self, path: Path) -> Tensor:
        """One file → uint8 ``[H, W, C]`` at ``image_size``."""
        from PIL import Image

        try:
            with Image.open(path) as img:
                if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # 16-bit: PIL's convert clips at 255
                    img = Image.fromarray(_rgb(img, repr(str(path))))
                img = img.convert("RGB" if self.channels == 3 else "L")
                if self.center_crop:
                    side = min(img.size)
                    left, top = (img.width - side) // 2, (img.height - side) // 2
                    img = img.crop((left, top, left + side, top + side))
                img = img.resize((self.image_size[1], self.image_size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except Exception as err:
            raise DataError(f"cannot decode image {str(path)!r}: {type(err).__name__}: {err}") from err
        return torch.from_numpy(array.reshape(*self.image_size, self.channels).copy())

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        path, label = self.samples[index]
        return {"inputs": self.load(path), "target": torch.tensor(label, dtype=torch.int64)}


# ----------------------------------------------------------------------------------------------- text


def _tokenizer():
    try:
        from .tokenizer import ByteTokenizer
    except ImportError as err:  # pragma: no cover - the tokenizer ships with the package
        raise DataError("perceivers.data.tokenizer.ByteTokenizer is not available") from err
    return ByteTokenizer


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"text file {str(path)!r} is not valid UTF-8 (byte {err.start}): {err.reason}") from err
    except OSError as err:
        raise DataError(f"cannot read text file {str(path)!r}: {err}") from err


def find_text_files(paths: str | Path | Sequence[str | Path], suffixes: Sequence[str] = (".txt",)) -> list[Path]:
    """Expand files, folders (recursively, files with ``suffixes``) and glob patterns into a sorted list."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for entry in paths:
        text = str(entry)
        if any(ch in text for ch in "*?["):
            base = Path(text).anchor or "."
            pattern = str(Path(text).relative_to(base)) if Path(text).is_absolute() else text
            matches = sorted(Path(base).glob(pattern))
            if not matches:
                where = "" if Path(text).is_absolute() else f" in the working directory {os.getcwd()}"
                raise DataError(f"text pattern {text!r} matches no files{where}")
            found.extend(p for p in matches if p.is_file())
            continue
        path = Path(entry)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
            if not files:
                raise DataError(f"text folder {text!r} has no files ending in {list(suffixes)}")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
            raise DataError(f"text file or folder {text!r} does not exist{where}")
    return found


class ByteChunkDataset(Dataset):
    """Text files as one byte stream cut into windows of ``seq_len`` token ids, for masked LM.

    Files are UTF-8 encoded with :class:`~perceivers.data.ByteTokenizer` (ids = byte + 6), joined with
    a newline, and cut into consecutive windows; the last window is right-padded with PAD (0). Items:
    ``{"inputs": int64 [seq_len], "mask": bool [seq_len]}`` (True = real byte).
    """

    def __init__(self, texts: Sequence[str], seq_len: int, *, source: str = "texts") -> None:
        if seq_len < 2:
            raise DataError(f"seq_len must be >= 2, got {seq_len}")
        tokenizer = _tokenizer()(max_length=seq_len)
        ids = [tid for text in texts for tid in tokenizer.encode(text + "\n")]
        if not ids or not any(t.strip() for t in texts):
            raise DataError(f"{source}: no text to train on")
        self.seq_len = seq_len
        self.ids = torch.tensor(ids, dtype=torch.int64)
        self.pad_id = tokenizer.pad_id

    @classmethod
    def from_files(cls, paths: str | Path | Sequence[str | Path], seq_len: int) -> ByteChunkDataset:
        files = find_text_files(paths)
        return cls([_read_text(p) for p in files], seq_len, source=f"{len(files)} text file(s)")

    def __len__(self) -> int:
        return (self.ids.numel() + self.seq_len - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        chunk = self.ids[index * self.seq_len:(index + 1) * self.seq_len]
        mask = torch.ones(self.seq_len, dtype=torch.bool)
        if chunk.numel() < self.seq_len:
            mask[chunk.numel():] = False
            chunk = torch.cat((chunk, chunk.new_full((self.seq_len - chunk.numel(),), self.pad_id)))
        return {"inputs": chunk, "mask": mask}


class TextFolderDataset(Dataset):
    """Text classification from files stored one folder per class: ``root/<class>/<file>.txt``.

    Each file is one sample, encoded to byte ids and cut at ``max_length``. Items: ``{"inputs": int64
    [L], "target": int64}`` of varying ``L``; batch them with :func:`collate_tokens`.
    """

    def __init__(
        self, root: str | Path, max_length: int, *, classes: Sequence[str] | None = None,
        suffixes: Sequence[str] = (".txt",),
    ) -> None:
        self.root = Path(root)
        folders = _class_folders(self.root, "text")
        names = [p.name for p in folders]
        if classes is not None:
            unknown = sorted(set(names) - set(classes))
            if unknown:
                raise DataError(f"text folder {str(self.root)!r} has classes {unknown} not in {list(classes)}")
            names = list(classes)
        self.classes = names
        tokenizer = _tokenizer()(max_length=max_length)
        self.samples: list[tuple[Tensor, int]] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                if path.is_file() and path.suffix in suffixes:
                    ids = tokenizer.encode(_read_text(path))[:max_length]
                    if not ids:
                        raise DataError(f"text file {str(path)!r} is empty: a sample needs text (remove the file "
                                        "or write its text)")
                    self.samples.append((torch.tensor(ids, dtype=torch.int64), label))
        if not self.samples:
            raise DataError(f"text folder {str(self.root)!r} has no files ending in {list(suffixes)}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids, label = self.samples[index]
        return {"inputs": ids, "target": torch.tensor(label, dtype=torch.int64)}


def collate_tokens(items: Sequence[dict[str, Tensor]], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad variable-length ``inputs`` to the longest in the batch and add ``mask`` (True = real)."""
    length = max(item["inputs"].shape[0] for item in items)
    inputs = torch.full((len(items), length), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for row, item in enumerate(items):
        n = item["inputs"].shape[0]
        inputs[row, :n] = item["inputs"]
        mask[row, :n] = item["mask"][:n] if "mask" in item else True
    batch = {"inputs": inputs, "mask": mask}
    if "target" in items[0]:
        batch["target"] = torch.stack([item["target"] for item in items])
    return batch


def mask_tokens(
    ids: Tensor,
    mask: Tensor,
    *,
    mask_prob: float = 0.15,
    mask_id: int = 3,
    vocab_size: int = 262,
    first_regular_id: int = 6,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT-style corruption of byte ids for masked LM.

    A ``mask_prob`` share of the real tokens (``mask`` True) is chosen; of those 80% become
    ``mask_id``, 10% a random byte id and 10% stay. At least one token per sequence is chosen.

    Returns:
        corrupted ids ``[B, L]`` and labels ``[B, L]`` (the original id where chosen, -100 elsewhere).
    """
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    scores = torch.rand(ids.shape, generator=generator).masked_fill(~mask, 2.0)
    chosen = (scores < mask_prob) & mask
    # guarantee one target per sequence with any real token (the lowest score)
    has_real = mask.any(dim=-1)
    first = scores.argmin(dim=-1)
    chosen[has_real, first[has_real]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    corrupted = ids.clone()
    corrupted[chosen & (action < 0.8)] = mask_id
    random_ids = torch.randint(first_regular_id, vocab_size, ids.shape, generator=generator)
    swap = chosen & (action >= 0.8) & (action < 0.9)
    corrupted[swap] = random_ids[swap]
    return corrupted, labels
