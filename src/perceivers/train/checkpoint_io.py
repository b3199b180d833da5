"""Checkpoints written atomically: a crash mid-write leaves the previous file intact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..safe_files import atomic_path

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`perceivers.safe_files.atomic_path`: to a temporary file in the target
    folder, fsynced, then ``os.replace``-d into place.

    ``os.replace`` is atomic on POSIX and Windows within one filesystem, so readers (and a resumed run)
    see either the old complete file or the new complete file, never a partial one — also when the
    process is killed with SIGKILL mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` saving local checkpoints with :func:`atomic_torch_save`.

    Remote paths (``s3://`` …) fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
