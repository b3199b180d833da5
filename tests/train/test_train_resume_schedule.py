"""Resuming with a schedule planned for another number of steps stops before training with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_configs import tiny_config, write_config

from perceivers import cli
from perceivers.train.tasks import schedule_length

SCHEDULES = {
    "OneCycleLR": {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.01}},
    "FlatCosine": {"class_path": "perceivers.train.FlatCosine", "init_args": {"flat_fraction": 0.5}},
    "WarmupCosine": {"class_path": "perceivers.train.WarmupCosine", "init_args": {"warmup_steps": 1}},
}
NO_PLOTS = {"attention": False, "learning_curves": False}


def _config(tmp_path: Path, schedule: str, **trainer) -> str:
    config = tiny_config(tmp_path / "run", task={"lr_scheduler": SCHEDULES[schedule]},
                         trainer={"max_epochs": 5, **trainer}, plots=NO_PLOTS)
    return write_config(tmp_path / "run.yaml", config)


def _ckpt(tmp_path: Path) -> dict:
    return torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_longer_resume_stops_before_training(tmp_path, capsys, schedule):
    config = _config(tmp_path, schedule)
    assert cli.main(["fit", "--config", config, "--trainer.max_steps", "2"]) == 0
    saved = _ckpt(tmp_path)
    assert saved["global_step"] == 2 and schedule_length(saved["lr_schedulers"][0]) == ("total_steps", 2)
    capsys.readouterr()

    code = cli.main(["fit", "--config", config, "--trainer.max_steps", "4", "--resume", "true"])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "perceivers fit: error: the checkpoint" in err and "last.ckpt" in err
    assert f"schedule ({schedule}) planned for 2 steps, but this run has 4 (total_steps)" in err
    assert "Resume with the same trainer.max_epochs / trainer.max_steps" in err
    assert "Traceback" not in err
    after = _ckpt(tmp_path)
    assert after["global_step"] == 2  # nothing trained, nothing saved
    assert all(torch.equal(after["state_dict"][k], v) for k, v in saved["state_dict"].items())


def test_more_epochs_on_resume_stops_before_training(tmp_path, capsys):
    """The auditor's case: one epoch (3 steps here), then --resume with max_epochs 2."""
    config = _config(tmp_path, "OneCycleLR")
    assert cli.main(["fit", "--config", config, "--trainer.max_epochs", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["fit", "--config", config, "--trainer.max_epochs", "2", "--resume", "true"]) == 2
    assert "planned for 3 steps, but this run has 6 (total_steps)" in capsys.readouterr().err
    assert _ckpt(tmp_path)["global_step"] == 3


def test_same_length_resume_continues(tmp_path, capsys):
    """A crash part-way (after the checkpoint of step 2 of 4, mid-epoch), then the same command with --resume:
    the one-cycle schedule continues to its end."""
    run = tmp_path / "run"
    base = tiny_config(run, task={"lr_scheduler": SCHEDULES["OneCycleLR"]}, trainer={"max_epochs": 5, "max_steps": 4},
                       checkpoint={"every_n_train_steps": 2, "monitor": None}, plots=NO_PLOTS)
    crash = {"class_path": "train_helpers.CrashAt", "init_args": {"step": 2}}
    crashing = write_config(tmp_path / "crash.yaml", {**base, "trainer": {**base["trainer"], "callbacks": [crash]}})
    with pytest.raises(RuntimeError, match="CrashAt"):
        cli.main(["fit", "--config", crashing])
    assert _ckpt(tmp_path)["global_step"] == 2
    assert cli.main(["fit", "--config", write_config(tmp_path / "run.yaml", base), "--resume", "true"]) == 0
    final = _ckpt(tmp_path)
    assert final["global_step"] == 4
    assert final["lr_schedulers"][0]["total_steps"] == 4 and final["lr_schedulers"][0]["last_epoch"] == 4
    # the same weights as a run that was not interrupted: the resumed epoch continues after its trained
    # batches (the schedule's length, asked for before the checkpoint is read, used to restart it at 0)
    whole = tiny_config(tmp_path / "whole", task={"lr_scheduler": SCHEDULES["OneCycleLR"]},
                        trainer={"max_epochs": 5, "max_steps": 4},
                        checkpoint={"every_n_train_steps": 2, "monitor": None}, plots=NO_PLOTS)
    assert cli.main(["fit", "--config", write_config(tmp_path / "whole.yaml", whole)]) == 0
    uninterrupted = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
    capsys.readouterr()


def test_schedule_length():
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(params)
    assert schedule_length(vars(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7))) == ("T_max", 7)
    assert schedule_length(torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=3).state_dict()) == ("total_iters", 3)
    assert schedule_length(vars(torch.optim.lr_scheduler.StepLR(optimizer, step_size=2))) is None
