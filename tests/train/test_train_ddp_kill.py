"""Killing a 2-process DDP run (torchrun, gloo) with SIGKILL to the whole process group after a mid-epoch checkpoint,
then running the same command with `--resume true`: it finishes, no checkpoint is damaged, the steps continue from
the checkpoint, and the final weights equal an uninterrupted 2-process run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_configs import tiny_config, write_config
from train_kill_helpers import read_journal
from train_torchrun import PERCEIVERS, TORCHRUN, env, free_port, load, max_optimizer_diff, max_weight_diff

EPOCHS, BATCHES, EVERY = 3, 6, 2  # 18 steps; checkpoints every 2 steps (mid-epoch) and at epoch ends
CHECKPOINT = 8  # killed after this mid-epoch checkpoint (epoch 1, batch 2) and one more step


def _config(root: Path, pause: tuple[int, Path] | None = None, journal: Path | None = None) -> dict:
    # shuffled; no augmentation or dropout (as in the other multi-process tests)
    data = {"class_path": "perceivers.train.DigitsDataModule",
            "init_args": {"batch_size": 16, "eval_batch_size": 32, "shuffle": True}}
    callbacks = []
    if pause is not None:
        callbacks.append({"class_path": "train_kill_helpers.PauseAt",
                          "init_args": {"step": pause[0], "flag": str(pause[1])}})
    if journal is not None:
        callbacks.append({"class_path": "train_kill_helpers.StepJournal", "init_args": {"path": str(journal)}})
    return tiny_config(root, data=data,
                       trainer={"max_epochs": EPOCHS, "limit_train_batches": BATCHES, "callbacks": callbacks},
                       checkpoint={"every_n_train_steps": EVERY, "save_last": True},
                       plots={"attention": False, "learning_curves": False})


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_run(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a torchrun launch and all its workers at once. torchrun starts every worker in a session (process
    group) of its own, so killing the launcher's group alone leaves the workers training as orphans: each
    worker's group is killed too. Returns the worker pids, after they are gone."""
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)):
        assert time.monotonic() < deadline, "workers survived SIGKILL"
        time.sleep(0.05)
    return workers


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError):  # not there yet
        return -1


@pytest.mark.slow
def test_sigkill_ddp_process_group_then_resume(tmp_path: Path):
    # the uninterrupted run goes on meanwhile (its own rendezvous port: not --standalone)
    reference = tmp_path / "reference"
    reference_command = [*TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                         "--master_port", str(free_port()), *PERCEIVERS, "fit", "--config",
                         write_config(tmp_path / "reference.yaml", _config(reference))]
    with (tmp_path / "reference.log").open("w") as log:
        uninterrupted = subprocess.Popen(reference_command, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    try:
        # the run pauses once, one step past the mid-epoch checkpoint at step CHECKPOINT (that step is lost work)
        run, journal, paused = tmp_path / "run", tmp_path / "journal.txt", tmp_path / "paused"
        config = write_config(tmp_path / "run.yaml", _config(run, pause=(CHECKPOINT + 1, paused), journal=journal))
        command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *PERCEIVERS, "fit", "--config", config]
        with (tmp_path / "killed.log").open("w") as log:
            proc = subprocess.Popen(command, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        last = run / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 240
        try:
            while not paused.exists():
                assert proc.poll() is None, "training ended before it could be killed:\n" + (
                    (tmp_path / "killed.log").read_text()[-3000:])
                assert time.monotonic() < deadline, "the run did not reach its pause in time"
                time.sleep(0.05)
        finally:
            workers = kill_run(proc)  # torchrun and both workers
        assert proc.returncode == -signal.SIGKILL and len(workers) == 2
        killed_at = _step(last)  # loads: the file is complete
        assert killed_at == CHECKPOINT
        rows_before = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/loss_step")]

        # the same torchrun command again, with --resume true
        started = time.monotonic()
        resumed = subprocess.run([*command, "--resume", "true"], env=env(), capture_output=True, text=True, timeout=300,
                                 check=False)
        resume_seconds = time.monotonic() - started
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert f"--resume: continuing from {last}" in resumed.stderr + resumed.stdout

        # no checkpoint is damaged, none half-written is left
        checkpoints = sorted(run.glob("checkpoints/*.ckpt"))
        assert checkpoints and not list(run.glob("checkpoints/.*tmp*"))
        for path in checkpoints:
            state = load(path)
            assert all(torch.isfinite(v).all() for v in state["state_dict"].values()), path

        final = load(last)
        assert final["global_step"] == EPOCHS * BATCHES
        killed_launch, resumed_launch = read_journal(journal)
        assert killed_launch == [0, *range(CHECKPOINT + 1)]  # step 8 ran; the next checkpoint (10) never came
        assert resumed_launch == [killed_at, *range(killed_at, EPOCHS * BATCHES)]  # continued at the checkpoint's step
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
        assert steps == list(range(EPOCHS * BATCHES)), (killed_at, rows_before, steps)  # each step logged once
        assert [int(r["epoch"]) for r in rows if r.get("val/loss")] == list(range(EPOCHS))

        assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-4000:]
    finally:
        if uninterrupted.poll() is None:
            kill_run(uninterrupted)
    expected = load(reference / "checkpoints" / "last.ckpt")
    weights, optimizer = max_weight_diff(expected, final), max_optimizer_diff(expected, final)
    print(f"DDP (2 processes) killed with SIGKILL after step {killed_at}, resumed ({resume_seconds:.1f} s): "
          f"max |Δweight| = {weights:.3g}, max |Δoptimizer state| = {optimizer:.3g} vs an uninterrupted run")
    assert expected["global_step"] == final["global_step"]
    assert weights <= 1e-6 and optimizer <= 1e-7, (weights, optimizer)
