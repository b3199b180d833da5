"""Test-only callbacks, importable by the subprocesses the tests start (this folder is put on PYTHONPATH)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


class SlowDown(Callback):
    """Sleep after every training batch, so a test can kill the run part-way."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)



class CrashAt(Callback):
    """Raise ``RuntimeError`` before training batch ``step`` (global step), as a crash part-way through a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"CrashAt: crashed at step {trainer.global_step}")
