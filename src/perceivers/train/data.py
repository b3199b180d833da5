"""LightningDataModules over :mod:`perceivers.data.datasets`.

``batch_size`` is the **global** batch: under ``N`` processes each loads ``batch_size / N`` samples, so a
recipe means the same optimisation on one process or many. Splits are seeded (``split_seed``) and do
not depend on the training seed. Image batches are augmented (training only) and normalised on the
device after transfer; normalisation statistics are computed from the training split and saved in
checkpoints. ``ImageFolderDataModule(pipeline="official")`` instead prepares every image in the loader
workers as DeepMind's ImageNet pipeline does (:class:`~perceivers.data.image.ImageNetTrainTransform`,
:class:`~perceivers.data.image.ImageNetEvalTransform`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..data.datasets import (
    ArrayDataset,
    ByteChunkDataset,
    DataError,
    ImageFolderDataset,
    TextFolderDataset,
    check_labels,
    cifar_has_test,
    collate_tokens,
    find_text_files,
    load_digits,
    mask_tokens,
    read_cifar,
    split_indices,
)
from ..data.image import IMAGENET_MEAN, IMAGENET_STD, ImageNetEvalTransform, ImageNetTrainTransform
from ..data.transforms import ImageAugment, Normalize, channel_stats, resize, to_float

__all__ = [
    "ArrayDataModule",
    "CIFARDataModule",
    "DigitsDataModule",
    "EpochShuffleSampler",
    "EpochTaggedSampler",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MaskedBytesDataModule",
    "PerImageFolder",
    "ResumableDataLoader",
    "TextClassificationDataModule",
]


def run_seed() -> int:
    """The run's ``seed_everything`` value (Lightning exports it to ``PL_GLOBAL_SEED``; 0 without one)."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


class EpochShuffleSampler(DistributedSampler):
    """Training order as a function of ``(seed, epoch)`` only, split across processes by global batch.

    One permutation ``P`` of the dataset is drawn per epoch (identity when ``shuffle=False``), cut to a
    multiple of ``num_replicas``; process ``rank`` takes ``P[rank::num_replicas]``. With a per-process
    batch ``b``, global batch ``k`` is then exactly ``P[k·b·N : (k+1)·b·N]`` — the batch one process
    with batch ``b·N`` would see — so a run on N processes follows the single-process run, and a resumed
    run sees the same order. ``seed`` defaults to the run's ``seed_everything`` value. Lightning calls
    :meth:`set_epoch` at every epoch and keeps this sampler under DDP (it is a ``DistributedSampler``).
    """

    def __init__(self, data_source: Sized, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int | None = None) -> None:
        seed = run_seed() if seed is None else seed
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        order = order[: self.num_samples * self.num_replicas]
        return iter(order[self.rank::self.num_replicas].tolist())


class EpochTaggedSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` whose items are ``(index, epoch)``, for datasets that draw their own
    augmentation per item: the draws then follow from ``(seed, epoch, index)`` whichever worker loads the item,
    also after a mid-epoch resume (whose new workers start afresh)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((index, epoch) for index in super().__iter__())


class EvalShardSampler(DistributedSampler):
    """Evaluation order split across processes with every sample counted once.

    Process ``rank`` takes ``rank, rank + N, …`` (its :attr:`real` samples), then repeats a sample until
    every process has the same number (``ceil(n / N)``, so that sharded models run the same number of
    forward passes). The tasks leave those repeats out of their metrics (:meth:`real_rows`); Lightning keeps
    this sampler under DDP and FSDP (it is a ``DistributedSampler``), where its own pads the split with
    samples counted twice.
    """

    def __init__(self, data_source: Sized, *, num_replicas: int, rank: int) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.real = len(range(rank, len(data_source), num_replicas))

    def __iter__(self) -> Iterator[int]:
        own = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(own + [own[0] if own else 0] * (self.num_samples - len(own)))

    def real_rows(self, batch_idx: int, batch_size: int) -> int:
        """How many rows of batch ``batch_idx`` (batches of ``batch_size``) are samples of this process."""
        return max(0, min(batch_size, self.real - batch_idx * batch_size))


class ResumableDataLoader(DataLoader):
    """A training DataLoader that resumes mid-epoch.

    Lightning stores :meth:`state_dict` in checkpoints — the epoch to continue and the batches of it
    already trained on, from ``progress`` — and calls :meth:`load_state_dict` before iterating again after
    a restart. The next iteration then sets the sampler to that epoch (Lightning creates the first
    iterator after a restart before it sets the sampler's epoch) and skips the finished batches (they are
    loaded and dropped), so with a deterministic sampler the run continues with exactly the batches it had
    not seen, in the original order.
    """

    def __init__(self, *args: Any, progress: Callable[[], dict[str, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return dict(self.progress()) if self.progress is not None else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is not None:
            sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(int(resume.get("epoch", 0)))
        iterator = super().__iter__()
        for _ in range(int(resume.get("batches_done", 0)) if resume else 0):
            next(iterator, None)
        return iterator


class _BaseDataModule(pl.LightningDataModule):
    """Loaders, the global-to-per-process batch size and the shared split logic."""

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int, shuffle: bool,
                 split_seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.split_seed = split_seed
        self.datasets: dict[str, Dataset] = {}
        self.collate_fn: Callable | None = None

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def per_process(self, batch_size: int) -> int:
        world = self._world_size()
        if batch_size % world:
            raise DataError(f"the global batch_size {batch_size} must be divisible by the {world} processes")
        return batch_size // world

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            raise DataError(f"{type(self).__name__} has no {split!r} split")
        dataset = self.datasets[split]
        size = self.per_process(self.batch_size if train else self.eval_batch_size)
        # each loader draws its worker seeds from its own generator, never from the global random state that
        # augmentation, mixing and dropout use: a resumed run then draws what the uninterrupted run drew even
        # though it builds its loaders at other moments (a restart after an epoch's last batch skips the
        # validation loader the uninterrupted run built before the next epoch)
        seed = run_seed() * 7 + (1 if train else 2)
        common = {"batch_size": size, "num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                  "collate_fn": self.collate_fn, "generator": torch.Generator().manual_seed(seed)}
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if not train:
            if world > 1:
                return DataLoader(dataset, sampler=EvalShardSampler(dataset, num_replicas=world, rank=rank), **common)
            return DataLoader(dataset, shuffle=False, **common)
        sampler_class = EpochTaggedSampler if getattr(dataset, "takes_epoch", False) else EpochShuffleSampler
        sampler = sampler_class(dataset, num_replicas=world, rank=rank, shuffle=self.shuffle)
        return ResumableDataLoader(dataset, sampler=sampler, drop_last=True, progress=self._progress, **common)

    def _progress(self) -> dict[str, int]:
        """Where training stands, for a mid-epoch resume: the epoch to continue and its finished batches."""
        trainer = self.trainer
        if trainer is None:
            return {"epoch": 0, "batches_done": 0}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        if done >= trainer.num_training_batches:  # saved at the end of an epoch: continue with the next one
            return {"epoch": trainer.current_epoch + 1, "batches_done": 0}
        return {"epoch": trainer.current_epoch, "batches_done": done}

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.datasets else "val", False)

    def example_batch(self, size: int = 2) -> dict[str, Tensor]:
        """A small processed batch (as the model will see it) for checks before training."""
        split = "train" if "train" in self.datasets else next(iter(self.datasets))
        dataset = self.datasets[split]
        items = [dataset[i] for i in range(min(size, len(dataset)))]
        batch = (self.collate_fn or torch.utils.data.default_collate)(items)
        return self.transform_batch(batch, train=False)

    def transform_batch(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):  # the model summary's example input, already processed (Task.summarize_with)
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.transform_batch(batch, train=training)


class ImageDataModule(_BaseDataModule):
    """Images ``[H, W, C]`` with integer labels; subclasses fill ``self.datasets`` in :meth:`load`.

    Args:
        batch_size: global training batch size.
        eval_batch_size: global validation/test batch size (default ``batch_size``).
        image_size: resize every batch to this side (int) or ``(H, W)``; None keeps the stored size.
        augment: training augmentation (flip, zoom, rotate, translate, resized crop, RandAugment);
            None or ``{}`` with all off disables it.
        normalize: subtract the training split's per-channel mean, divide by its std.
        val_fraction: share of the training data held out for validation when there is no separate
            validation set.
        num_workers: DataLoader worker processes.
        shuffle: shuffle training batches.
        split_seed: seed of the train/validation split.
    """

    def __init__(
        self,
        *,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        augment: ImageAugment | None = None,
        normalize: bool = True,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle, split_seed)
        self.image_size = image_size
        self.augment = augment
        self.normalize = normalize
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.normalizer: Normalize | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] = []
        self.channels: int | None = None
        self._loaded = False

    # ------------------------------------------------------------------ to implement
    def load(self) -> None:
        """Fill ``self.datasets`` (``train``, ``val``, optional ``test``), ``num_classes``, ``class_names``."""
        raise NotImplementedError

    def train_images_for_stats(self) -> Tensor | Sequence[Tensor]:
        """Training images (or batches of them) for the normalisation statistics."""
        dataset = self.datasets["train"]
        limit = min(len(dataset), 2048)
        step = max(1, len(dataset) // limit)
        return [torch.stack([dataset[i]["inputs"] for i in range(0, len(dataset), step)[:limit]])]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        self.load()
        self._loaded = True
        if self.normalize and self.normalizer is None:
            mean, std = channel_stats(self.train_images_for_stats())
            self.normalizer = Normalize(mean.tolist(), std.tolist())

    def transform_batch(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        images = to_float(batch["inputs"])
        if self.image_size is not None:
            images = resize(images, self.image_size)
        if train and self.augment is not None:
            # pixels shifted in from outside the image take the mean colour (0 after normalisation)
            fill = images.new_tensor(self.normalizer.mean) if self.normalizer is not None else 0.0
            images = self.augment(images, fill=fill)
        if self.normalizer is not None:
            images = self.normalizer(images)
        return {**batch, "inputs": images}

    def state_dict(self) -> dict[str, Any]:
        if self.normalizer is None:
            return {}
        return {"normalize_mean": self.normalizer.mean, "normalize_std": self.normalizer.std}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "normalize_mean" in state:
            self.normalizer = Normalize(state["normalize_mean"], state["normalize_std"])

    # ------------------------------------------------------------------ helpers
    def _hold_out(self, dataset: Dataset, labels: Tensor | None = None) -> tuple[Dataset, Dataset]:
        train, val = split_indices(len(dataset), [self.val_fraction], seed=self.split_seed)
        if len(val) == 0:
            raise DataError(f"val_fraction={self.val_fraction} leaves no validation samples out of {len(dataset)}")
        return Subset(dataset, train.tolist()), Subset(dataset, val.tolist())


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes, no download).

    Seeded split: ``test_fraction`` for test, ``val_fraction`` for validation, the rest for training.
    """

    def __init__(
        self,
        *,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        augment: ImageAugment | None = None,
        normalize: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, image_size=image_size,
                         augment=augment, normalize=normalize, val_fraction=val_fraction, num_workers=num_workers,
                         shuffle=shuffle, split_seed=split_seed)
        self.test_fraction = test_fraction

    def load(self) -> None:
        images, labels = load_digits()
        train, val, test = split_indices(len(images), [self.val_fraction, self.test_fraction], seed=self.split_seed)
        for name, idx in (("train", train), ("val", val), ("test", test)):
            self.datasets[name] = ArrayDataset(images[idx], labels[idx], name=f"digits {name}")
        self.num_classes, self.channels = 10, 1
        self.class_names = [str(i) for i in range(10)]

    def train_images_for_stats(self) -> Tensor:
        return self.datasets["train"].inputs


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 / CIFAR-100 from the official python-pickle folders (``cifar-10-batches-py`` /
    ``cifar-100-python``); ``val_fraction`` of the training files is held out, the test file is the test set.

    Args:
        root: the pickle folder or a folder containing it.
        variant: ``"cifar10"``, ``"cifar100"`` or None (detect from the folder).
        coarse: CIFAR-100 superclasses (20) instead of the 100 fine labels.
    """

    def __init__(
        self,
        root: str,
        *,
        variant: str | None = None,
        coarse: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        augment: ImageAugment | None = None,
        normalize: bool = True,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, image_size=image_size,
                         augment=augment, normalize=normalize, val_fraction=val_fraction, num_workers=num_workers,
                         shuffle=shuffle, split_seed=split_seed)
        if not Path(root).exists():
            raise DataError(f"CIFAR folder {root!r} does not exist")
        self.root, self.variant, self.coarse = root, variant, coarse

    def load(self) -> None:
        images, labels, names = read_cifar(self.root, train=True, variant=self.variant, coarse=self.coarse)
        train, val = split_indices(len(images), [self.val_fraction], seed=self.split_seed)
        self.datasets["train"] = ArrayDataset(images[train], labels[train], name="CIFAR train")
        self.datasets["val"] = ArrayDataset(images[val], labels[val], name="CIFAR validation")
        if cifar_has_test(self.root, self.variant):
            test_images, test_labels, _ = read_cifar(self.root, train=False, variant=self.variant, coarse=self.coarse)
            self.datasets["test"] = ArrayDataset(test_images, test_labels, name="CIFAR test")
        self.num_classes, self.class_names, self.channels = len(names), names, 3

    def train_images_for_stats(self) -> Tensor:
        return self.datasets["train"].inputs


class ImageFolderDataModule(ImageDataModule):
    """Images stored one folder per class.

    ``root`` either holds the class folders directly (validation split held out with
    ``val_fraction``) or has ``train/`` and optionally ``val/`` (or ``validation/``) and ``test/``
    sub-folders, each with the same class folders. Images are read with Pillow and resized to
    ``load_size`` as they are loaded (``image_size`` then resizes batches, if set).

    Args:
        load_size: side (or ``(H, W)``) every file is resized to when read; with ``pipeline="official"`` the
            side of the crops.
        channels: 3 (RGB) or 1 (greyscale).
        center_crop: crop the central square before resizing (``"batched"`` only).
        pipeline: ``"batched"`` — files resized to ``load_size`` as they are read, then augmented and
            normalised on the device, batch by batch (fast); ``"official"`` — DeepMind's ImageNet pipeline,
            one image at a time in the loader workers on the CPU: training images are cropped from the whole
            file, flipped and RandAugmented on the uint8 crop, then resized with TF's bicubic kernel
            (:class:`~perceivers.data.image.ImageNetTrainTransform`, which takes ``augment``'s ``flip``,
            ``crop_scale`` and RandAugment settings; zoom, rotate and translate are refused); evaluation images
            get the official 224/256 centre crop (:class:`~perceivers.data.image.ImageNetEvalTransform`); both
            normalised with the ImageNet mean/std (``normalize=False``: values in [0, 1]). Batches then arrive
            ready (float32 ``[B, H, W, 3]``). Random draws follow from the run's seed, the epoch and the item.
    """

    def __init__(
        self,
        root: str,
        *,
        load_size: int | tuple[int, int] = 64,
        channels: int = 3,
        center_crop: bool = False,
        pipeline: str = "batched",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        augment: ImageAugment | None = None,
        normalize: bool = True,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, image_size=image_size,
                         augment=augment, normalize=normalize, val_fraction=val_fraction, num_workers=num_workers,
                         shuffle=shuffle, split_seed=split_seed)
        if not Path(root).is_dir():
            raise DataError(f"image folder {root!r} does not exist or is not a directory")
        self.root, self.load_size, self.channels, self.center_crop = Path(root), load_size, channels, center_crop
        if pipeline not in ("batched", "official"):
            raise DataError(f"pipeline must be 'batched' or 'official', got {pipeline!r}")
        self.pipeline = pipeline
        if pipeline == "official":
            if channels != 3:
                raise DataError(f"pipeline='official' reads RGB images: channels must be 3, got {channels}")
            if image_size is not None:
                raise DataError("pipeline='official' makes crops of load_size already: leave image_size unset, got "
                                f"{image_size!r}")
            if augment is not None and (augment.zoom or augment.rotate or augment.translate):
                raise DataError("pipeline='official' augments with crop, flip and RandAugment only: zoom, rotate and "
                                f"translate must be 0, got {augment.zoom}, {augment.rotate}, {augment.translate}")

    def official_transforms(self) -> tuple[ImageNetTrainTransform | ImageNetEvalTransform, ImageNetEvalTransform]:
        """The per-image training and evaluation transforms of ``pipeline="official"``."""
        size = self.load_size if isinstance(self.load_size, int) else tuple(self.load_size)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.normalize else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        evaluate = ImageNetEvalTransform(size, mean=mean, std=std)
        augment = self.augment
        if augment is None:
            return evaluate, evaluate
        train = ImageNetTrainTransform(
            size, area_range=tuple(augment.crop_scale or (0.08, 1.0)), flip=augment.flip,
            randaugment_layers=augment.randaugment_layers, randaugment_magnitude=augment.randaugment_magnitude,
            mean=mean, std=std)
        return train, evaluate

    def setup(self, stage: str | None = None) -> None:
        if self.pipeline == "batched":
            super().setup(stage)
        elif not self._loaded:  # no statistics to compute: the official pipeline normalises with ImageNet's
            self.load()
            self._loaded = True

    def transform_batch(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        if self.pipeline == "official":  # prepared in the workers
            return batch
        return super().transform_batch(batch, train)

    def _folder(self, path: Path, classes: Sequence[str] | None = None) -> ImageFolderDataset:
        return ImageFolderDataset(path, self.load_size, channels=self.channels, classes=classes,
                                  center_crop=self.center_crop)

    def load(self) -> None:
        train_dir = self.root / "train"
        if train_dir.is_dir():
            train = self._folder(train_dir)
            self.datasets["train"] = train
            val_dir = next((self.root / n for n in ("val", "validation") if (self.root / n).is_dir()), None)
            if val_dir is not None:
                self.datasets["val"] = self._folder(val_dir, train.classes)
            else:
                self.datasets["train"], self.datasets["val"] = self._hold_out(train)
            if (self.root / "test").is_dir():
                self.datasets["test"] = self._folder(self.root / "test", train.classes)
            classes = train.classes
        else:
            full = self._folder(self.root)
            self.datasets["train"], self.datasets["val"] = self._hold_out(full)
            classes = full.classes
        self.num_classes, self.class_names = len(classes), list(classes)
        if self.pipeline == "official":
            train_transform, eval_transform = self.official_transforms()
            for split, dataset in self.datasets.items():
                if isinstance(dataset, Subset):
                    folder, indices = dataset.dataset, list(dataset.indices)
                else:
                    folder, indices = dataset, None
                transform = train_transform if split == "train" else eval_transform
                self.datasets[split] = PerImageFolder(folder, transform, indices=indices)


class PerImageFolder(Dataset):
    """Files of an :class:`ImageFolderDataset` (or the ``indices`` of them) through a per-image transform.

    Items are ``{"inputs": float32 [H, W, C], "target": int64}``. A transform that takes a ``generator``
    (:class:`~perceivers.data.image.ImageNetTrainTransform`) gets one seeded from ``(seed, epoch, index)``:
    the dataset takes ``(index, epoch)`` keys (from :class:`EpochTaggedSampler`; a plain index is epoch 0),
    so an item's augmentation does not depend on which worker loads it or on a restart.

    Args:
        seed: default: the run's ``seed_everything`` value.
    """

    def __init__(self, folder: ImageFolderDataset, transform: Callable[..., Tensor], *,
                 indices: Sequence[int] | None = None, seed: int | None = None) -> None:
        self.folder, self.transform = folder, transform
        self.indices = list(range(len(folder))) if indices is None else list(indices)
        self.seed = run_seed() if seed is None else seed
        self.takes_epoch = isinstance(transform, ImageNetTrainTransform)

    def __len__(self) -> int:
        return len(self.indices)

    def generator(self, index: int, epoch: int = 0) -> torch.Generator:
        """The generator item ``index`` draws from in ``epoch``."""
        state = np.random.SeedSequence([self.seed % 2**32, epoch, index]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.folder.samples[self.indices[index]]
        if self.takes_epoch:
            image = self.transform(path, generator=self.generator(index, epoch))
        else:
            image = self.transform(path)
        return {"inputs": image.permute(1, 2, 0).contiguous(), "target": torch.tensor(label, dtype=torch.int64)}


class ArrayDataModule(ImageDataModule):
    """In-memory tensors or numpy arrays, for library users (not from YAML).

    >>> dm = ArrayDataModule(train=(x_train, y_train), test=(x_test, y_test), batch_size=32)  # doctest: +SKIP

    Each split is ``(inputs, targets)`` or ``(inputs, targets, mask)``. Inputs ``[N, H, W, C]`` are
    treated as images (augmentation and normalisation apply); other shapes (sequences ``[N, L, C]``
    or ids ``[N, L]``) pass through unchanged. Without ``val`` a ``val_fraction`` share of ``train`` is
    held out.

    Args:
        num_classes: number of classes; default ``max(label) + 1``; labels outside ``[0, num_classes)``
            raise :class:`~perceivers.data.datasets.DataError`.
    """

    def __init__(
        self,
        train: tuple[Any, ...],
        val: tuple[Any, ...] | None = None,
        test: tuple[Any, ...] | None = None,
        *,
        num_classes: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        augment: ImageAugment | None = None,
        normalize: bool = True,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, image_size=image_size,
                         augment=augment, normalize=normalize, val_fraction=val_fraction, num_workers=num_workers,
                         shuffle=shuffle, split_seed=split_seed)
        self.splits = {"train": ArrayDataset(*train, name="train arrays")}
        if val is not None:
            self.splits["val"] = ArrayDataset(*val, name="validation arrays")
        if test is not None:
            self.splits["test"] = ArrayDataset(*test, name="test arrays")
        labels = self.splits["train"].targets
        self.num_classes = check_labels(labels, num_classes, "train arrays")
        for name in ("val", "test"):
            if name in self.splits:
                check_labels(self.splits[name].targets, self.num_classes, f"{name} arrays")
        inputs = self.splits["train"].inputs
        self.is_image = inputs.ndim == 4
        if not self.is_image:
            self.normalize = False
        self.channels = inputs.shape[-1] if self.is_image else None

    def load(self) -> None:
        self.datasets = dict(self.splits)
        if "val" not in self.datasets:
            train = self.datasets["train"]
            keep, held = split_indices(len(train), [self.val_fraction], seed=self.split_seed)
            mask = train.mask
            self.datasets["train"] = ArrayDataset(train.inputs[keep], train.targets[keep],
                                                  None if mask is None else mask[keep], name="train arrays")
            self.datasets["val"] = ArrayDataset(train.inputs[held], train.targets[held],
                                                None if mask is None else mask[held], name="validation arrays")
        self.class_names = [str(i) for i in range(self.num_classes)]

    def train_images_for_stats(self) -> Tensor:
        return self.datasets["train"].inputs

    def transform_batch(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        if not self.is_image:
            return batch
        return super().transform_batch(batch, train)


class TextClassificationDataModule(_BaseDataModule):
    """Text classification from ``root/<class>/*.txt`` (one file = one sample), as byte ids.

    ``root`` holds class folders directly (``val_fraction`` held out) or ``train/``, ``val/``, ``test/``
    sub-folders. Batches: ``inputs [B, L]`` ids padded to the longest, ``mask [B, L]``, ``target [B]``.

    Args:
        max_length: bytes kept per sample.
    """

    def __init__(
        self,
        root: str,
        *,
        max_length: int = 512,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle, split_seed)
        if not Path(root).is_dir():
            raise DataError(f"text folder {root!r} does not exist or is not a directory")
        self.root, self.max_length, self.val_fraction = Path(root), max_length, val_fraction
        self.collate_fn = collate_tokens
        self.num_classes: int | None = None
        self.class_names: list[str] = []
        self._loaded = False

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        self._loaded = True
        base = self.root / "train" if (self.root / "train").is_dir() else self.root
        train = TextFolderDataset(base, self.max_length)
        if base != self.root and (self.root / "val").is_dir():
            self.datasets["train"] = train
            self.datasets["val"] = TextFolderDataset(self.root / "val", self.max_length, classes=train.classes)
        else:
            keep, held = split_indices(len(train), [self.val_fraction], seed=self.split_seed)
            self.datasets["train"], self.datasets["val"] = Subset(train, keep.tolist()), Subset(train, held.tolist())
        if base != self.root and (self.root / "test").is_dir():
            self.datasets["test"] = TextFolderDataset(self.root / "test", self.max_length, classes=train.classes)
        self.num_classes, self.class_names = len(train.classes), train.classes


class MaskedBytesDataModule(_BaseDataModule):
    """Byte-level masked LM over text files: windows of ``seq_len`` byte ids, BERT-style corruption.

    Args:
        train_files: files, folders (``*.txt`` inside, recursively) or glob patterns.
        val_files, test_files: the same for validation/test; without ``val_files`` the last
            ``val_fraction`` of the training windows is held out.
        seq_len: bytes per window.
        mask_prob: share of bytes chosen as targets (80 % → [MASK], 10 % random byte, 10 % kept).

    Validation and test windows are masked once with a fixed seed, so their metrics are comparable
    across epochs; training windows are masked afresh every batch.
    """

    def __init__(
        self,
        train_files: list[str] | str,
        *,
        val_files: list[str] | str | None = None,
        test_files: list[str] | str | None = None,
        seq_len: int = 256,
        mask_prob: float = 0.15,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        shuffle: bool = True,
        split_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle, split_seed)
        find_text_files(train_files)  # fail now on missing paths
        for extra in (val_files, test_files):
            if extra is not None:
                find_text_files(extra)
        if not 0 < mask_prob < 1:
            raise DataError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.train_files, self.val_files, self.test_files = train_files, val_files, test_files
        self.seq_len, self.mask_prob, self.val_fraction = seq_len, mask_prob, val_fraction
        self._loaded = False

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        self._loaded = True
        train = ByteChunkDataset.from_files(self.train_files, self.seq_len)
        if self.val_files is not None:
            self.datasets["train"] = train
            val: Dataset = ByteChunkDataset.from_files(self.val_files, self.seq_len)
        else:
            n_val = max(1, round(len(train) * self.val_fraction))
            if len(train) - n_val < 1:
                raise DataError(f"the training text gives {len(train)} windows of {self.seq_len} bytes: too few to "
                                f"hold out {n_val} for validation; add text, lower seq_len or pass val_files")
            self.datasets["train"] = Subset(train, range(len(train) - n_val))
            val = Subset(train, range(len(train) - n_val, len(train)))
        self.datasets["val"] = _FixedMasks(val, self.mask_prob, seed=self.split_seed)
        if self.test_files is not None:
            test = ByteChunkDataset.from_files(self.test_files, self.seq_len)
            self.datasets["test"] = _FixedMasks(test, self.mask_prob, seed=self.split_seed + 1)

    def transform_batch(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        if "labels" in batch:
            return batch
        inputs, labels = mask_tokens(batch["inputs"].cpu(), batch["mask"].cpu(), mask_prob=self.mask_prob)
        device = batch["inputs"].device
        return {**batch, "inputs": inputs.to(device), "labels": labels.to(device)}


class _FixedMasks(Dataset):
    """A view of a byte dataset whose masking is drawn once per item from ``seed + index``."""

    def __init__(self, dataset: Dataset, mask_prob: float, seed: int) -> None:
        self.dataset, self.mask_prob, self.seed = dataset, mask_prob, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.dataset[index]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        inputs, labels = mask_tokens(item["inputs"][None], item["mask"][None], mask_prob=self.mask_prob,
                                     generator=generator)
        return {**item, "inputs": inputs[0], "labels": labels[0]}
