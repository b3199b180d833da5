"""Fault injection for training: SIGKILL at random moments + resume, NaN losses, a full disk mid-save.

Runs the real ``perceivers fit`` command (:func:`perceivers.train.cli.run_cli`, digits recipe with a
small model) in forked children, so each restart costs no import time. Used by
``test_reliability_training.py`` and ``scripts/reliability_report.py``.
"""

from __future__ import annotations

import errno
import io
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from perceivers.cli import resolve_config
from perceivers.train.cli import run_cli


class StepJournal(Callback):
    """Appends ``start <step>`` when fit (re)starts and ``step <step>`` after every optimizer step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, line: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:  # one write per line: survives SIGKILL
            f.write(line + "\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(f"start {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(f"step {trainer.global_step}")


class PoisonAt(Callback):
    """Makes the model output NaN from optimizer step ``step`` on (a diverging run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.latents.fill_(float("nan"))


class DiskFullAt(Callback):
    """From optimizer step ``step`` on, every checkpoint write fills the disk: half the bytes, then ENOSPC."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        real = torch.save

        def full_disk(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        torch.save = full_disk  # this (forked) process only


SMALL_MODEL = ["--model.init_args.model.init_args.num_latents", "8", "--model.init_args.model.init_args.latent_dim",
               "32", "--model.init_args.model.init_args.cross_heads", "1",
               "--model.init_args.model.init_args.latent_heads", "2"]


def fit_argv(root: Path, max_steps: int, *, every: int = 1, callbacks: list[tuple[str, dict]] = ()) -> list[str]:
    """``perceivers fit`` on the digits recipe, checkpointing every ``every`` steps, resumable."""
    argv = ["fit", "--config", resolve_config("digits"), "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(max_steps),
            "--trainer.max_epochs", "-1", "--checkpoint.every_n_train_steps", str(every), "--checkpoint.every_n_epochs", "null",
            "--checkpoint.monitor", "null", "--checkpoint.save_top_k", "0",
            "--trainer.val_check_interval", "1.0", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--plots.learning_curves", "false", "--plots.attention", "false", "--resume", "true",
            "--model.init_args.lr_scheduler", "null", *SMALL_MODEL]
    for class_path, init in callbacks:
        argv.append(f"--trainer.callbacks+={class_path}")
        for k, v in init.items():
            argv.append(f"--trainer.callbacks.{k}={v}")
    return argv


def _child(argv: list[str], log: str) -> None:  # pragma: no cover - runs in the forked process
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - also when pytest captured them
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    try:
        run_cli(argv)
    except BaseException as e:  # noqa: BLE001 - report and exit non-zero
        print(f"CHILD-ERROR {type(e).__name__}: {e}", flush=True)
        os._exit(3)
    os._exit(0)


def start(argv: list[str], log: Path) -> mp.Process:
    proc = mp.get_context("fork").Process(target=_child, args=(argv, str(log)), daemon=True)
    proc.start()
    return proc


def journal(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        kind, _, value = line.partition(" ")
        if value.strip().isdigit():
            out.append((kind, int(value)))
    return out


def read_checkpoint(path: Path) -> dict | None:
    """The checkpoint with weights_only=True (None if absent); raises if it is corrupt."""
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} holds non-finite weights: {bad[:3]}")
    return ckpt


@dataclass
class Segment:
    """One launch of ``perceivers fit --resume true``."""

    checkpoint_at_launch: int | None  # global_step of last.ckpt when it was launched (None: no checkpoint)
    started_at: int | None = None  # the step training (re)started from (None: killed during start-up)
    last_step: int | None = None  # highest optimizer step it completed
    killed_after_s: float | None = None  # None: ran to the end
    checkpoint_after: int | None = None  # global_step of last.ckpt after it ended (checked to load)
    exit_code: int | None = None
    half_written: int = 0  # temporary checkpoint files it left (killed mid-write; the next save removes them)


@dataclass
class KillRun:
    segments: list[Segment] = field(default_factory=list)
    final_step: int = -1
    steps_seen: set[int] = field(default_factory=set)
    temp_files: int = 0
    seconds: float = 0.0

    @property
    def kills(self) -> list[Segment]:
        return [s for s in self.segments if s.killed_after_s is not None]

    @property
    def lost_steps(self) -> list[int]:
        """Per kill: steps completed but not in the checkpoint that survived it (redone after resume)."""
        return [(s.last_step or 0) - (s.checkpoint_after or 0) for s in self.kills if s.last_step is not None]


def kill_resume_run(root: Path, *, kills: int, max_steps: int, seed: int, timeout: float = 300.0) -> KillRun:
    """Start ``perceivers fit``; SIGKILL it ``kills`` times at random moments, resuming each time; finish."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    jpath = root / "journal.txt"
    argv = fit_argv(root, max_steps, callbacks=[("_train_faults.StepJournal", {"path": str(jpath)})])
    ckpt = root / "checkpoints" / "last.ckpt"
    run = KillRun()
    t0 = time.monotonic()
    for i in range(kills + 1):
        state = read_checkpoint(ckpt)
        seg = Segment(None if state is None else state["global_step"])
        offset = len(journal(jpath))
        proc = start(argv, root / f"log{i}.txt")
        begin = time.monotonic()
        if i < kills:
            # a random moment: during start-up (1 in 5), else up to 0.1 s after a random optimizer step of
            # this launch (mid-step, mid-checkpoint-write, mid-validation ...)
            remaining = max(1, max_steps - (seg.checkpoint_at_launch or 0))
            spread = max(1, min(remaining, 2 * remaining // (kills - i + 1)))  # leave steps for later kills
            target = -1 if rng.random() < 0.2 else rng.randint(1, spread)
            while target > 0 and proc.is_alive() and time.monotonic() - begin < timeout:
                if sum(kind == "step" for kind, _ in journal(jpath)[offset:]) >= target:
                    break
                time.sleep(0.002)
            proc.join(rng.uniform(0.0, 0.5 if target < 0 else 0.1))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                seg.killed_after_s = time.monotonic() - begin
        proc.join(timeout)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"launch {i} did not finish in {timeout} s")
        seg.exit_code = proc.exitcode
        lines = journal(jpath)[offset:]
        seg.started_at = next((v for kind, v in lines if kind == "start"), None)
        seg.last_step = max((v for kind, v in lines if kind == "step"), default=None)
        folder = root / "checkpoints"
        seg.half_written = len(list(folder.glob(".*tmp*"))) if folder.exists() else 0
        after = read_checkpoint(ckpt)  # raises if the kill left a corrupt checkpoint
        seg.checkpoint_after = None if after is None else after["global_step"]
        run.segments.append(seg)
    run.final_step = -1 if run.segments[-1].checkpoint_after is None else run.segments[-1].checkpoint_after
    run.steps_seen = {v for kind, v in journal(jpath) if kind == "step"}
    run.temp_files = len(list((root / "checkpoints").glob(".*tmp*"))) if (root / "checkpoints").exists() else 0
    run.seconds = time.monotonic() - t0
    return run


def check_kill_run(run: KillRun, max_steps: int) -> None:
    """The properties a killed-and-resumed run must have (raises AssertionError naming the segment)."""
    final = run.segments[-1]
    assert final.killed_after_s is None and final.exit_code == 0, f"final launch: {final}"
    assert run.final_step == max_steps, f"finished at step {run.final_step}, not {max_steps}"
    assert run.steps_seen >= set(range(1, max_steps + 1)), "some optimizer steps never ran"
    for i, seg in enumerate(run.segments):
        # every launch resumed exactly from the checkpoint that survived the previous kill
        if seg.started_at is not None:
            assert seg.started_at == (seg.checkpoint_at_launch or 0), f"launch {i}: {seg}"
        # nothing beyond the last checkpoint was lost (checkpoints every step: at most the step in flight)
        if seg.killed_after_s is not None and seg.last_step is not None:
            assert seg.last_step - (seg.checkpoint_after or 0) <= 1, f"launch {i}: {seg}"
    assert run.temp_files == 0, f"{run.temp_files} temporary checkpoint files left behind"


def launch(root: Path, callbacks: list[tuple[str, dict]], max_steps: int, timeout: float = 300.0) -> tuple[int, str]:
    """Run ``perceivers fit --resume true`` to its end in a forked child → (exit code, its output)."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"log{len(list(root.glob('log*.txt')))}.txt"
    proc = start(fit_argv(root, max_steps, callbacks=callbacks), log)
    proc.join(timeout)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        raise TimeoutError(f"fit did not finish in {timeout} s")
    return proc.exitcode, log.read_text()


def nan_loss_run(root: Path, *, at: int, max_steps: int) -> dict:
    """A run whose loss turns NaN at step ``at``, then a clean resume. Returns what happened."""
    code, log = launch(root, [("_train_faults.PoisonAt", {"step": at})], max_steps)
    message = next((line for line in log.splitlines() if "NonFiniteLossError" in line), "")
    state = read_checkpoint(root / "checkpoints" / "last.ckpt")  # raises if it holds NaN weights
    resumed_code, _ = launch(root, [], max_steps)
    final = read_checkpoint(root / "checkpoints" / "last.ckpt")
    return {"exit_code": code, "message": message, "checkpoint_step": None if state is None else state["global_step"],
            "resumed_exit_code": resumed_code, "final_step": None if final is None else final["global_step"],
            "log": log}


def disk_full_run(root: Path, *, at: int, max_steps: int) -> dict:
    """A run whose checkpoint writes hit a full disk from step ``at`` on, then a resume with space again."""
    code, log = launch(root, [("_train_faults.DiskFullAt", {"step": at})], max_steps)
    message = next((line for line in log.splitlines() if "No space left" in line), "")
    state = read_checkpoint(root / "checkpoints" / "last.ckpt")
    litter = len(list((root / "checkpoints").glob(".*tmp*")))
    resumed_code, _ = launch(root, [], max_steps)
    final = read_checkpoint(root / "checkpoints" / "last.ckpt")
    return {"exit_code": code, "message": message, "checkpoint_step": None if state is None else state["global_step"],
            "temp_files": litter, "resumed_exit_code": resumed_code,
            "final_step": None if final is None else final["global_step"], "log": log}
