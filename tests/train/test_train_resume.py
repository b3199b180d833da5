"""A run killed with SIGKILL mid-training resumes from an intact checkpoint; steps and metrics continue."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_configs import tiny_config, write_config

from perceivers import cli
from perceivers.train.checkpoint_io import atomic_torch_save

HERE = Path(__file__).parent
EPOCHS, BATCHES = 4, 8


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _settings() -> dict:
    return {"trainer": {"max_epochs": EPOCHS, "limit_train_batches": BATCHES},
            "checkpoint": {"every_n_train_steps": 3, "save_last": True},  # mid-epoch checkpoints too
            "plots": {"attention": False, "learning_curves": True},
            "data": {"class_path": "perceivers.train.DigitsDataModule",
                     "init_args": {"batch_size": 16, "eval_batch_size": 64,
                                   "augment": {"flip": False, "zoom": 0.1, "translate": 0.1}}}}


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except FileNotFoundError:
        return -1


def test_sigkill_then_resume_continues(tmp_path: Path):
    run = tmp_path / "run"
    config = tiny_config(run, **_settings())
    slow = {"class_path": "train_helpers.SlowDown", "init_args": {"seconds": 0.15}}
    killed_config = write_config(tmp_path / "slow.yaml", {**config, "trainer": {**config["trainer"], "callbacks": [slow]}})
    command = [sys.executable, "-m", "perceivers.cli", "fit", "--config"]
    proc = subprocess.Popen([*command, killed_config], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    try:
        while _step(last) < BATCHES + 2:  # past the first epoch, part-way through the second
            assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _step(last)  # loads: the file is complete
    assert BATCHES + 2 <= killed_at < EPOCHS * BATCHES
    rows_before = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows_before, "metrics were written before the crash"

    resumed = subprocess.run([*command, write_config(tmp_path / "resume.yaml", config), "--resume", "true"],
                             env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--resume: continuing from {last}" in resumed.stderr + resumed.stdout
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == EPOCHS * BATCHES

    # the same run without the crash (in this process): identical weights, so the resumed run saw exactly
    # the batches it had not seen (mid-epoch resume), in the same order, with the same random state
    reference = tmp_path / "reference"
    assert cli.main(["fit", "--config", write_config(tmp_path / "ref.yaml", tiny_config(reference, **_settings()))]) == 0
    expected = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert expected["global_step"] == final["global_step"]
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert train_steps == sorted(set(train_steps)), "steps must increase without duplicates across the restart"
    assert train_steps == list(range(EPOCHS * BATCHES)), (killed_at, train_steps)  # each step once
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/loss")]
    assert val_epochs == list(range(EPOCHS))
    assert (run / "plots" / "learning_curves.png").is_file()


def test_atomic_save_survives_sigkill(tmp_path: Path):
    """Kill a process while it rewrites a large checkpoint over and over: the file always loads."""
    target = tmp_path / "ckpt.pt"
    atomic_torch_save({"version": -1, "blob": torch.zeros(1)}, target)
    code = (
        "import sys, torch; from perceivers.train.checkpoint_io import atomic_torch_save\n"
        "blob = torch.randn(4_000_000)\n"
        "for i in range(10_000):\n"
        "    atomic_torch_save({'version': i, 'blob': blob}, sys.argv[1]); print(i, flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let a few complete writes happen, then kill during one
        proc.stdout.readline()
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    data = torch.load(target, weights_only=False)
    assert data["version"] >= 1 and data["blob"].numel() == 4_000_000
    # the killed writer's temporary file (if the kill came mid-write) goes with the next write
    atomic_torch_save({"version": -2}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_next_write_removes_temporaries_of_dead_writers(tmp_path: Path):
    """A temporary file left by a killed writer of another target (a top-k checkpoint that is never written
    again) goes when any file of the folder is next written; one of a live process stays."""
    from perceivers.safe_files import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f".best-epoch=3.ckpt.tmp-{_HOST}-{dead.pid}"
    live = tmp_path / f".best-epoch=4.ckpt.tmp-{_HOST}-{os.getppid()}"
    elsewhere = tmp_path / f".best-epoch=5.ckpt.tmp-otherhost-{dead.pid}"  # another machine's, on a shared disk
    for path in (orphan, live, elsewhere):
        path.write_bytes(b"partial")
    atomic_torch_save({"step": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", live.name, elsewhere.name])


@pytest.mark.parametrize("checkpointing", ["last batch", "epoch end"])
def test_resume_after_an_epoch_draws_the_same_augmentation_and_mixing(tmp_path: Path, checkpointing: str):
    """Killed right after an epoch's checkpoint (saved after its last batch, or at the epoch's end after
    validation): the resumed run draws the augmentation and MixUp of the uninterrupted run, so the weights
    match exactly. (Before the loaders took their worker seeds from their own generators, the restart skipped
    a draw of the global random state and ended 3e-3 away.)"""
    data = {"class_path": "perceivers.train.DigitsDataModule",
            "init_args": {"batch_size": 16, "eval_batch_size": 64,
                          "augment": {"flip": False, "zoom": 0.1, "translate": 0.1}}}
    checkpoint = {"every_n_train_steps": 4, "monitor": None} if checkpointing == "last batch" else {}
    no_plots = {"attention": False, "learning_curves": False}

    def config(name: str, callbacks: list | None = None) -> str:
        trainer = {"max_epochs": 3, "limit_train_batches": 4, **({"callbacks": callbacks} if callbacks else {})}
        settings = tiny_config(tmp_path / name, task={"mixup_alpha": 0.2}, data=data, trainer=trainer,
                               checkpoint=checkpoint, plots=no_plots)
        return write_config(tmp_path / f"{name}-{len(callbacks or [])}.yaml", settings)

    crash = {"class_path": "train_helpers.CrashAt", "init_args": {"step": 5}}
    with pytest.raises(RuntimeError, match="CrashAt"):
        cli.main(["fit", "--config", config("run", [crash])])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    assert cli.main(["fit", "--config", config("run"), "--resume", "true"]) == 0
    assert cli.main(["fit", "--config", config("whole")]) == 0
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == whole["global_step"] == 12
    for name, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
