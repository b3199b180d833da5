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


class PrintBatches(Callback):
    """Print each training batch's targets (debugging)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        print(f"RANK{trainer.global_rank} step {trainer.global_step} targets {batch['target'].tolist()} "
              f"sum {float(batch['inputs'].sum()):.4f}", flush=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        g = pl_module.model.latents.grad
        print(f"RANK{trainer.global_rank} grad latents sum {float(g.sum()):.6f}", flush=True)
