"""Callbacks the ``perceivers`` CLI adds to every run: continuing metrics on resume, plots at the end of
fit, restoring the best weights, and a check that DDP replicas stayed identical. All of them also work
with a model sharded by FSDP (:mod:`perceivers.train.strategies`)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .loggers import truncate_metrics

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "ReplicaCheck", "RestoreBestWeights", "ResumableMetrics",
           "TrainingPlots", "metrics_csv_path"]


def metrics_csv_path(trainer: pl.Trainer) -> Path | None:
    """The ``metrics.csv`` of the trainer's first CSV logger, if any."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    return None


class ResumableMetrics(Callback):
    """Keep ``metrics.csv`` consistent with the checkpoint a run resumes from.

    Resuming from a checkpoint saved at step ``S`` drops the rows logged after ``S`` (they belong to
    steps that run again), so steps and curves continue without gaps or duplicates. A fresh ``fit``
    starts a new file.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = metrics_csv_path(trainer)
        if path is None:
            return
        if trainer.ckpt_path is None:  # a fresh run
            if path.is_file():
                path.unlink()
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "metrics_keys"):
                    experiment.metrics_keys = []
        else:
            dropped = truncate_metrics(str(path), trainer.global_step)
            if dropped:
                rank_zero_info(f"resumed at step {trainer.global_step}: dropped {dropped} metric rows logged after "
                               "that checkpoint")


class NonFiniteLossError(FloatingPointError):
    """Training stopped because the loss was NaN or infinite (before the weights were updated)."""


class NonFiniteLossGuard(Callback):
    """Stop ``fit`` at the first NaN/Inf training loss, before its backward pass and optimizer step.

    The weights and every checkpoint written so far stay finite; the error names the step and the
    last checkpoint to resume from (after lowering the learning rate, say).
    """

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        callback = trainer.checkpoint_callback
        last = (getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")) if callback else ""
        where = f"; the last good checkpoint is {last}" if last else "; no checkpoint was written yet"
        raise NonFiniteLossError(
            f"training loss is {float(loss.detach().float().reshape(-1)[0])} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}): stopped before updating the weights{where}"
        )


class RNGState(Callback):
    """Save the Python, NumPy and torch (CPU and CUDA) random states in checkpoints and restore them when a
    run resumes, so augmentation and dropout continue as if the run had not stopped."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # only tensors, ints and strings, so checkpoints still load with torch.load(weights_only=True)
        version, words, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": [version, torch.tensor(words, dtype=torch.int64), gauss],
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        version, words, gauss = state["python"]
        random.setstate((version, tuple(int(w) for w in words.tolist()), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class RestoreBestWeights(Callback):
    """At the end of ``fit``, load the weights of the best checkpoint (Keras' ``restore_best_weights``)."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best or not os.path.isfile(best):
            return
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        from .strategies import is_sharded

        if is_sharded(pl_module):  # FSDP: every process keeps its part of the full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(pl_module, state, options=StateDictOptions(full_state_dict=True))
        else:
            pl_module.load_state_dict(state)
        rank_zero_info(f"restored the best weights ({callback.monitor}={float(callback.best_model_score):.4g}) "
                       f"from {best}")


class TrainingPlots(Callback):
    """Write ``plots/learning_curves.png`` and, for image models, ``plots/attention.png`` at the end of fit.

    Args:
        learning_curves: plot every logged metric against the step.
        attention: plot the first cross-attention of the model over a validation image.
        sample_index: which validation sample to show.
    """

    def __init__(self, learning_curves: bool = True, attention: bool = True, sample_index: int = 0) -> None:
        self.learning_curves, self.attention, self.sample_index = learning_curves, attention, sample_index
        self.written: list[Path] = []

    def _out_dir(self, trainer: pl.Trainer) -> Path:
        path = metrics_csv_path(trainer)
        return (path.parent if path is not None else Path(trainer.default_root_dir)) / "plots"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from .strategies import is_sharded

        # a sharded model (FSDP) runs forward on every process together; rank 0 alone writes the files
        sharded = self.attention and is_sharded(pl_module)
        if not trainer.is_global_zero and not sharded:
            return
        out = self._out_dir(trainer)
        if not trainer.is_global_zero:
            self._attention(trainer, pl_module, out / "attention.png", write=False)
            return
        if self.learning_curves:
            for logger in trainer.loggers:
                logger.save()
            path = metrics_csv_path(trainer)
            if path is not None and path.is_file():
                from .plots import plot_learning_curves

                written = plot_learning_curves(path, out / "learning_curves.png")
                if written is not None:
                    self.written.append(written)
        if self.attention:
            written = self._attention(trainer, pl_module, out / "attention.png")
            if written is not None:
                self.written.append(written)
        for path in self.written:
            rank_zero_info(f"wrote {path}")

    def _attention(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Path,
                   write: bool = True) -> Path | None:
        datamodule = trainer.datamodule
        datasets = getattr(datamodule, "datasets", {})
        split = "val" if "val" in datasets else next(iter(datasets), None)
        if split is None or not hasattr(datamodule, "transform_batch"):
            return None
        item = datasets[split][min(self.sample_index, len(datasets[split]) - 1)]
        raw = item["inputs"]
        if raw.ndim != 3:  # images only
            return None
        from ..data.transforms import resize, to_float
        from .attention import cross_attention_maps
        from .plots import plot_attention

        batch = datamodule.transform_batch({"inputs": raw[None], "target": item["target"][None]}, train=False)
        inputs = batch["inputs"].to(pl_module.device)
        if getattr(pl_module, "input_layout", "channels_last") == "channels_first":
            inputs = inputs.permute(0, 3, 1, 2)
        model = getattr(pl_module.model, "_orig_mod", pl_module.model)
        try:
            with _gathered(model):
                weights, _ = cross_attention_maps(model, inputs)
        except TypeError as err:
            rank_zero_info(f"no attention picture: {err}")
            return None
        with torch.no_grad():
            pred = int(pl_module(batch["inputs"].to(pl_module.device)).argmax(-1)[0])
        if not write:
            return None
        names = getattr(datamodule, "class_names", []) or []
        label = int(item["target"])
        describe = (lambda i: names[i] if i < len(names) else str(i))
        shown = to_float(raw[None])
        size = getattr(datamodule, "image_size", None)
        if size is not None:
            shown = resize(shown, size)
        return plot_attention(shown[0], weights[0], out,
                              title=f"first cross-attention · label {describe(label)} · predicted {describe(pred)}")


@contextmanager
def _gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every FSDP2 unit of ``model`` holds its full parameters (a collective on all processes), so
    code may use submodules outside ``forward``; outside, they are sharded again. No-op for other models."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


class ReplicaCheck(Callback):
    """After training, check that every process holds the same parameters (DDP keeps replicas equal;
    a difference means a broken set-up such as unsynchronised buffers or rank-dependent code).

    Writes ``replica_check.json`` (max abs difference to rank 0, per-rank checksums) next to the
    metrics and raises ``RuntimeError`` above ``tolerance``. Does nothing on one process.
    """

    def __init__(self, tolerance: float = 0.0, output: str | None = None) -> None:
        self.tolerance, self.output = tolerance, output

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size < 2 or not dist.is_available() or not dist.is_initialized():
            return
        from .strategies import gathered_parameters

        # FSDP: the gathered full parameters (a sharded run compares what a checkpoint would hold)
        flat = torch.cat([p.detach().float().reshape(-1).cpu() for _, p in gathered_parameters(pl_module)])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = torch.tensor([(flat - reference).abs().max().item()])
        checksum = torch.tensor([flat.double().sum().item()], dtype=torch.float64)
        diffs = [torch.zeros_like(diff) for _ in range(trainer.world_size)]
        sums = [torch.zeros_like(checksum) for _ in range(trainer.world_size)]
        dist.all_gather(diffs, diff)
        dist.all_gather(sums, checksum)
        worst = max(float(d) for d in diffs)
        from .strategies import is_sharded

        report = {"world_size": trainer.world_size, "global_step": trainer.global_step, "sharded": is_sharded(pl_module),
                  "max_abs_diff": worst, "checksums": [float(s) for s in sums]}
        if trainer.is_global_zero:
            path = Path(self.output) if self.output else (
                (metrics_csv_path(trainer) or Path(trainer.default_root_dir) / "x").parent / "replica_check.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
        if worst > self.tolerance:
            msg = f"parameters differ across processes after training: max |Δ| = {worst:.3g}"
            rank_zero_warn(msg)
            raise RuntimeError(msg)
