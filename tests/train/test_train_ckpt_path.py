"""A --ckpt_path with no file stops with `perceivers <command>: error: …` naming it (exit status 2)."""

from __future__ import annotations

import warnings

import pytest
import torch
from train_configs import tiny_config, write_config

from perceivers import cli
from perceivers.train.cli import check_ckpt_path
from perceivers.train.tasks import ConfigError


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_missing_ckpt_path(tmp_path, capsys, command):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    missing = tmp_path / "none.ckpt"
    assert cli.main([command, "--config", config, "--ckpt_path", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"perceivers {command}: error: ckpt_path {missing} does not exist" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_missing_ckpt_path_with_resume(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    assert cli.main(["fit", "--config", config, "--resume", "true", "--ckpt_path", "nowhere/last.ckpt"]) == 2
    err = capsys.readouterr().err
    assert "perceivers fit: error: ckpt_path nowhere/last.ckpt does not exist (here: " in err


def test_check_ckpt_path(tmp_path):
    for keyword in (None, "last", "best", "hpc", "registry", "registry:model:latest", "s3://bucket/x.ckpt"):
        check_ckpt_path(keyword)  # left to Lightning
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    check_ckpt_path(tmp_path / "x.ckpt")
    check_ckpt_path(str(tmp_path))  # sharded checkpoints are folders
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a checkpoint.*an empty file"):
        check_ckpt_path(tmp_path / "empty.ckpt")
    with pytest.raises(ConfigError, match="does not exist"):
        check_ckpt_path(tmp_path / "y.ckpt")


@pytest.mark.parametrize("content", [b"step,loss\n1,0.5\n", b"\x89PNG\r\n\x1a\n" + bytes(20)], ids=["text", "png"])
def test_ckpt_path_that_is_no_checkpoint(tmp_path, capsys, content):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    (tmp_path / "bad.ckpt").write_bytes(content)
    assert cli.main(["test", "--config", config, "--ckpt_path", str(tmp_path / "bad.ckpt")]) == 2
    err = capsys.readouterr().err
    assert f"perceivers test: error: ckpt_path {tmp_path / 'bad.ckpt'} is not a checkpoint" in err
    assert "Traceback" not in err


def test_model_settings_replaced_by_the_checkpoints_are_named(tmp_path):
    """Lightning builds the model from the checkpoint's saved settings under --ckpt_path; settings of this run
    that they replace are listed in a warning (they used to vanish silently), and a matching run warns nothing."""
    no_plots = {"attention": False, "learning_curves": False}
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run", plots=no_plots))
    assert cli.main(["fit", "--config", config]) == 0
    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["validate", "--config", config, "--ckpt_path", last]) == 0
        assert not [w for w in caught if "--ckpt_path" in str(w.message)]
        assert cli.main(["validate", "--config", config, "--ckpt_path", last,
                         "--model.init_args.model.init_args.depth", "3",
                         "--model.init_args.optimizer.init_args.lr", "0.5"]) == 0
    [message] = [str(w.message) for w in caught if "--ckpt_path" in str(w.message)]
    assert f"settings saved in the checkpoint {last}" in message
    assert "model.init_args.model.init_args.depth: 3 -> 1" in message
    assert "model.init_args.optimizer.init_args.lr: 0.5 -> 0.001" in message
