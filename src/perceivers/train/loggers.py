"""A CSV logger whose metrics file survives restarts, so a resumed run continues the same curve."""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ..safe_files import atomic_path

__all__ = ["RunCSVLogger", "truncate_metrics"]


class _KeepingWriter(ExperimentWriter):
    """Lightning's writer, minus deleting an existing ``metrics.csv``; it appends under the old header."""

    def _check_log_dir_exists(self) -> None:  # Lightning deletes the old file here
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/metrics.csv`` (no name/version sub-folders by default) that keeps
    earlier rows: :class:`~perceivers.train.callbacks.ResumableMetrics` truncates them to the resumed
    checkpoint, or clears them at the start of a fresh ``fit``."""

    def __init__(self, save_dir: str = "runs", name: str | None = "", version: int | str | None = "",
                 prefix: str = "", flush_logs_every_n_steps: int = 50) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> _FabricWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_metrics(path: str, max_step: int) -> int:
    """Drop the rows of a metrics CSV logged after ``max_step``; returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    keep = [r for r in rows if r.get("step") in ("", None) or int(float(r["step"])) <= max_step]
    if len(keep) == len(rows):
        return 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    return len(rows) - len(keep)
