"""Test-only callbacks for kill-and-resume tests, importable by torchrun workers (this folder is on PYTHONPATH):
a journal of the steps each launch runs, and a one-time pause at a chosen step for the test to kill the run in."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepJournal(Callback):
    """Append ``start <step>`` when a launch starts training and ``step <n>`` before each optimizer step (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _write(self, trainer, line: str) -> None:
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(line + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, f"start {trainer.global_step}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._write(trainer, f"step {trainer.global_step}")


def read_journal(path: Path) -> list[list[int]]:
    """The steps each launch ran, one list per launch (its first entry: the step it started at)."""
    launches: list[list[int]] = []
    for line in path.read_text().splitlines():
        kind, value = line.split()
        if kind == "start":
            launches.append([int(value)])
        else:
            launches[-1].append(int(value))
    return launches


class PauseAt(Callback):
    """Once per ``flag`` file: after the optimizer step that brings ``global_step`` to ``step``, write ``flag`` and
    sleep (every process), so a test can kill the run at a known point. Later launches do not pause."""

    def __init__(self, step: int, flag: str, seconds: float = 120.0) -> None:
        self.step, self.flag, self.seconds = step, Path(flag), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.flag.exists():
            trainer.strategy.barrier()  # every process got here before the flag says so
            if trainer.is_global_zero:
                self.flag.write_text(str(self.step))
            time.sleep(self.seconds)
