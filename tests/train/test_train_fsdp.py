"""FSDP (`--trainer.strategy fsdp` → perceivers.train.FSDP2Strategy) under torchrun, 2 processes on gloo:
the gathered weights equal a one-process run with the same global batch, a run resumed from a mid-run
checkpoint ends where the uninterrupted run ended, and the checkpoints are ordinary full state dicts."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from train_configs import TINY_PERCEIVER, tiny_config, write_config
from train_torchrun import failure, fresh, load, max_optimizer_diff, max_weight_diff, run_standalone

from perceivers import cli

EPOCHS, BATCHES = 2, 4  # 8 steps; checkpoints every 3 steps: step=3 is part-way through the first epoch
# depth 3 with tied weights: the shared block runs twice per forward (FSDP gathers it twice)
TIED = {**TINY_PERCEIVER, "init_args": {**TINY_PERCEIVER["init_args"], "depth": 3, "weight_tie_layers": True}}


def _config(root: Path, **trainer) -> dict:
    # shuffled; no augmentation or dropout (their random draws depend on the process); clipping on, as in the
    # digits recipe (the gradient norm is computed over the shards)
    data = {"class_path": "perceivers.train.DigitsDataModule",
            "init_args": {"batch_size": 16, "eval_batch_size": 32, "shuffle": True}}
    return tiny_config(root, model=TIED, data=data,
                       trainer={"max_epochs": EPOCHS, "limit_train_batches": BATCHES, "gradient_clip_val": 0.5,
                                **trainer},
                       plots={"attention": True, "learning_curves": False},
                       checkpoint={"every_n_train_steps": 3, "save_top_k": -1, "monitor": None, "filename": "{step}"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same recipe on one process (in this process) and with FSDP on two (torchrun)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    assert cli.main(["fit", "--config", write_config(tmp / "single.yaml", _config(tmp / "single"))]) == 0
    out = run_standalone(["fit", "--config", write_config(tmp / "fsdp.yaml", _config(tmp / "fsdp")),
                          "--trainer.strategy", "fsdp"], prepare=fresh(tmp / "fsdp"))
    assert out.returncode == 0, failure(out)
    (tmp / "fsdp.log").write_text(out.stdout + out.stderr)
    return {"tmp": tmp, "single": tmp / "single", "fsdp": tmp / "fsdp", "fsdp_config": tmp / "fsdp.yaml"}


def test_fsdp_two_processes_match_one_process(runs):
    log = (runs["tmp"] / "fsdp.log").read_text()
    assert "FSDP2Strategy: 2 process(es) on cpu, 2 sharded blocks (model.blocks.0, model.blocks.1)" in log

    report = json.loads((runs["fsdp"] / "replica_check.json").read_text())
    assert report["world_size"] == 2 and report["sharded"] and report["max_abs_diff"] == 0.0

    single = load(runs["single"] / "checkpoints" / "last.ckpt")
    fsdp = load(runs["fsdp"] / "checkpoints" / "last.ckpt")
    assert single["global_step"] == fsdp["global_step"] == EPOCHS * BATCHES
    # a full state dict: plain tensors under the unsharded names, as a one-process run saves them
    assert all(type(v) is torch.Tensor for v in fsdp["state_dict"].values())
    weights, optimizer = max_weight_diff(single, fsdp), max_optimizer_diff(single, fsdp)
    print(f"FSDP (2 processes) vs 1 process after {EPOCHS * BATCHES} steps: max |Δweight| = {weights:.3g}, "
          f"max |Δoptimizer state| = {optimizer:.3g}")
    # float sums in another order only; a different batch split would move weights by ~lr = 1e-3
    assert weights < 2e-5 and optimizer < 1e-6, (weights, optimizer)
    assert (runs["fsdp"] / "plots" / "attention.png").is_file()  # drawn from the gathered weights


def test_fsdp_resume_from_a_mid_run_checkpoint(runs, tmp_path):
    """`--resume true` under FSDP from the step-3 checkpoint (mid-epoch) ends with the uninterrupted run's weights
    and optimizer state (the sharded optimizer state is restored, not restarted)."""
    resumed = tmp_path / "resumed"

    def prepare() -> None:
        fresh(resumed)()
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(runs["fsdp"] / "checkpoints" / "step=3.ckpt", resumed / "checkpoints" / "last.ckpt")

    out = run_standalone(["fit", "--config", write_config(tmp_path / "resume.yaml", _config(resumed)),
                          "--trainer.strategy", "fsdp", "--resume", "true"], prepare=prepare)
    assert out.returncode == 0, failure(out)
    assert "--resume: continuing from" in out.stdout + out.stderr

    final, expected = load(resumed / "checkpoints" / "last.ckpt"), load(runs["fsdp"] / "checkpoints" / "last.ckpt")
    assert final["global_step"] == expected["global_step"] == EPOCHS * BATCHES
    weights, optimizer = max_weight_diff(expected, final), max_optimizer_diff(expected, final)
    print(f"FSDP resumed at step 3 vs uninterrupted: max |Δweight| = {weights:.3g}, max |Δoptimizer| = {optimizer:.3g}")
    assert weights <= 1e-6 and optimizer <= 1e-7, (weights, optimizer)
    steps = [int(r["step"]) for r in csv.DictReader((resumed / "metrics.csv").open()) if r.get("train/loss_step")]
    assert steps == list(range(3, EPOCHS * BATCHES)), steps  # only the steps after the checkpoint ran


def test_fsdp_checkpoints_load_without_fsdp(runs, tmp_path):
    """One process reads FSDP checkpoints: the task, `perceivers predict`, and `--resume` mid-run (optimizer
    state included) — ending with the one-process run's weights."""
    from perceivers.train import ClassificationTask

    last = runs["fsdp"] / "checkpoints" / "last.ckpt"
    task = ClassificationTask.load_from_checkpoint(last)
    saved = load(last)["state_dict"]
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in task.model.state_dict().items())

    config = write_config(tmp_path / "one.yaml", _config(tmp_path / "one"))
    # a fraction, not the integer 1: once sklearn.datasets has been imported in this (pytest) process,
    # jsonargparse reads Trainer's `int | float` limits "1" as 1.0 (= all batches); a fresh CLI process reads 1
    assert cli.main(["predict", "--config", config, "--ckpt_path", str(last),
                     "--trainer.limit_predict_batches", "0.1"]) == 0  # 1 of the 12 test batches
    rows = list(csv.DictReader((tmp_path / "one" / "predictions.csv").open()))
    assert len(rows) == 32 and {"prediction", "probability"} <= set(rows[0])

    (tmp_path / "one" / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(runs["fsdp"] / "checkpoints" / "step=3.ckpt", tmp_path / "one" / "checkpoints" / "last.ckpt")
    assert cli.main(["fit", "--config", config, "--resume", "true"]) == 0
    final, single = load(tmp_path / "one" / "checkpoints" / "last.ckpt"), load(runs["single"] / "checkpoints" / "last.ckpt")
    weights = max_weight_diff(single, final)
    print(f"1 process resumed from the FSDP step-3 checkpoint vs 1 process throughout: max |Δweight| = {weights:.3g}")
    assert weights < 2e-5 and max_optimizer_diff(single, final) < 1e-6


def test_fsdp_bf16_mixed_and_refusals(tmp_path, monkeypatch, capsys):
    """One process with FSDP in this process: bf16-mixed trains (float32 weights); precisions FSDP2Strategy does
    not run and a compiled model stop before training with a message."""
    from train_torchrun import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    base = _config(tmp_path / "bf16", max_epochs=1, limit_train_batches=2)
    config = write_config(tmp_path / "bf16.yaml", base)
    assert cli.main(["fit", "--config", config, "--trainer.strategy", "fsdp", "--trainer.precision", "bf16-mixed"]) == 0
    state = load(tmp_path / "bf16" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    capsys.readouterr()

    assert cli.main(["fit", "--config", config, "--trainer.strategy", "fsdp2", "--trainer.precision", "64-true"]) == 2
    assert "FSDP2Strategy runs with precision 32-true, bf16-mixed (autocast" in capsys.readouterr().err
    assert cli.main(["fit", "--config", config, "--trainer.strategy", "fsdp",
                     "--model.init_args.compile", "true"]) == 2
    assert "train uncompiled under FSDP" in capsys.readouterr().err
