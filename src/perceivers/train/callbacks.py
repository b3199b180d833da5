"""Callbacks the ``perceivers`` CLI adds to every run: continuing metrics on resume, plots at the end of
fit, restoring the best weights, and a check that DDP replicas stayed identical. All of them also work
with a model sharded by FSDP (:mod:`perceivers.train.strategies`)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .loggers import truncate_metrics

__all__ = ["LatestCheckpoint", "NonFiniteGradientError", "NonFiniteGradientGuard", "NonFiniteLossError", "NonFiniteLossGuard",
           "ReplicaCheck", "RestoreBestWeights", "ResumableMetrics",
           "TrainingPlots", "metrics_csv_path"]


def metrics_csv_path(trainer: pl.Trainer) -> Path | None:
    """The ``metrics.csv`` of the trainer's first CSV logger, if any."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.log_dir) / "metrics.csv"
    return None


class LatestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows the run, as ``--resume`` expects.

    Lightning 2.6 writes ``last.ckpt`` at an epoch end only when a top-k checkpoint is written at the same
    step: with ``monitor`` and ``save_top_k: 1``, an epoch whose ``val/loss`` does not improve leaves
    ``last.ckpt`` at the last improvement (and ``save_top_k: 0`` never refreshes it before the end of
    training). Here ``save_last`` also writes it at every epoch end (every ``every_n_epochs``) whose top-k
    check wrote nothing. Arguments and every other behaviour are ``ModelCheckpoint``'s.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        due = self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0
        if self.save_last is True and due and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """``"; the last good checkpoint is <path>"`` (``last.ckpt``, else the best one), or that none was written."""
    callback = trainer.checkpoint_callback
    last = (getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")) if callback else ""
    return f"; the last good checkpoint is {last}" if last else "; no checkpoint was written yet"


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
        raise NonFiniteLossError(
            f"training loss is {float(loss.detach().float().reshape(-1)[0])} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}): stopped before updating the weights{last_good_checkpoint(trainer)}"
        )


class NonFiniteGradientError(FloatingPointError):
    """Training stopped after several optimizer steps in a row had NaN/Inf gradients (each step was skipped)."""


def gradient_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together (one fused pass; NaN or Inf if any gradient element is)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


class NonFiniteGradientGuard(Callback):
    """Skip the optimizer step of a batch whose gradients hold NaN or Inf although its loss is finite (an
    overflow in the backward pass), and stop ``fit`` after ``max_consecutive`` such batches in a row.

    A skipped step leaves the weights and the optimizer state exactly as they were: the gradients are dropped
    (set to ``None``), so the optimizer passes over every parameter; the step still counts (``global_step``,
    schedule), as with a gradient scaler's skipped steps. Each skip warns; the stop raises
    :class:`NonFiniteGradientError` naming the last good checkpoint (the skipped steps changed nothing, so
    the checkpoints written meanwhile are good too).

    The test is the total gradient norm: a :class:`~perceivers.train.tasks.Task` reuses the norm it computes
    for ``gradient_clip_val`` (clipping by norm), otherwise this computes one norm over the gradients (one
    fused pass). Under a sharded model (FSDP) the norm covers all shards, so every process decides the same;
    under DDP the gradients are already averaged. It reads one scalar per step (a device sync on GPUs).

    Off under a gradient scaler (``16-mixed``): the scaler already skips steps with non-finite gradients and
    lowers its scale. ``max_consecutive=0`` turns the guard off.
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0 (0 = off), got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped: list[int] = []  # global steps whose optimizer step was skipped

    def active(self, trainer: pl.Trainer) -> bool:
        """Whether this run is checked: the guard is on and no gradient scaler skips steps already."""
        return self.max_consecutive > 0 and getattr(trainer.precision_plugin, "scaler", None) is None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.active(trainer) or getattr(pl_module, "reports_gradient_norm", False):
            return  # a Task checks the norm it computes for clipping (its configure_gradient_clipping)
        self.check(trainer, optimizer, gradient_norm(p for g in optimizer.param_groups for p in g["params"]))

    def check(self, trainer: pl.Trainer, optimizer: Any, norm: torch.Tensor) -> bool:
        """``True`` when ``norm`` is finite; otherwise drop the gradients of ``optimizer`` (the step then changes
        nothing), warn, and raise :class:`NonFiniteGradientError` at ``max_consecutive`` in a row."""
        from torch.distributed.tensor import DTensor

        if isinstance(norm, DTensor):  # FSDP: the norm over every shard (the same on every process)
            norm = norm.full_tensor()
        if bool(torch.isfinite(norm)):
            self.consecutive = 0
            return True
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.consecutive += 1
        self.skipped.append(trainer.global_step)
        value = float(norm)
        if self.consecutive >= self.max_consecutive:
            first = self.skipped[-self.consecutive]
            raise NonFiniteGradientError(
                f"non-finite gradients from a finite loss in {self.consecutive} optimizer steps in a row (steps "
                f"{first}-{trainer.global_step}, epoch {trainer.current_epoch}; gradient norm {value}): stopped; "
                f"those steps were skipped, the weights are finite{last_good_checkpoint(trainer)}"
            )
        rank_zero_warn(
            f"gradient norm is {value} at step {trainer.global_step} (epoch {trainer.current_epoch}) with a finite "
            f"loss: skipped the optimizer step for this batch ({self.consecutive} in a row; training stops at "
            f"{self.max_consecutive})"
        )
        return False


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
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), inputs.dtype)
        inputs = inputs.to(dtype)  # bf16-true / 16-true models take their own dtype
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
