"""The `perceivers` command: dispatch, help, --print_config, a tiny fit/test, and clear errors on bad input."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from train_configs import TINY_PERCEIVER, tiny_config, write_config
from train_files import write_image_folder

from perceivers import cli


def test_help_is_fast_and_light():
    code = ("import sys, perceivers.cli as c; c.main(['--help']); "
            "bad = [m for m in ('lightning', 'torchmetrics', 'matplotlib', 'jsonargparse') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "fit" in out.stdout and "predict" in out.stdout


def test_unknown_command(capsys):
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_predict_and_convert_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_run_command", lambda module, command, args: calls.append((module, args)) or 0)
    monkeypatch.setattr(cli, "_run_lightning", lambda command, args: calls.append(("lightning", args)) or 0)
    cli.main(["predict", "cat.png", "--model", "vision-perceiver-fourier", "--config", '{"num_labels": 3}'])
    cli.main(["predict", "--config", "digits", "--ckpt_path", "x.ckpt"])
    cli.main(["predict", "--data.init_args.batch_size", "4"])
    cli.main(["convert", "in.pickle", "out"])
    assert [c[0] for c in calls] == ["perceivers.commands.predict", "lightning", "lightning",
                                     "perceivers.commands.convert"]


def test_recipe_names_resolve():
    assert cli.resolve_config("digits") == str(cli.RECIPE_DIR / "digits.yaml")
    assert Path(cli.resolve_config("digits")).parts[-3:] == ("perceivers", "recipes", "digits.yaml")
    assert cli.resolve_config("no/such.yaml") == "no/such.yaml"  # a path: jsonargparse names it


def test_print_config_shows_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", "digits", "--trainer.max_epochs", "3", "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: perceivers.Perceiver" in out and "max_epochs: 3" in out
    assert "class_path: perceivers.train.DigitsDataModule" in out


def test_every_recipe_parses(capsys):
    for recipe in sorted(cli.RECIPE_DIR.glob("*.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit", "--config", str(recipe), "--print_config"])
        assert exit_info.value.code in (0, None), recipe
    capsys.readouterr()


def test_tiny_fit_then_test(tmp_path: Path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run", trainer={"max_epochs": 2}))
    assert cli.main(["fit", "--config", config]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "last checkpoint" in out and "plot:" in out
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt", "plots/learning_curves.png",
                 "plots/attention.png"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1
    assert "normalize_mean" in ckpt["DigitsDataModule"]
    record = {name: (run / name).read_text() for name in ("config.yaml", "hparams.yaml")}
    # the test's settings differ from the training's: the run's record of its training must stay
    assert cli.main(["test", "--config", config, "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                     "--trainer.max_epochs", "5", "--seed_everything", "3"]) == 0
    rows = (run / "metrics.csv").read_text().splitlines()
    assert "test/acc" in rows[0] and "val/acc_top5" in rows[0]
    assert {name: (run / name).read_text() for name in record} == record


def _fails(tmp_path: Path, capsys, config: dict, message: str, command: str = "fit") -> None:
    path = write_config(tmp_path / "bad.yaml", config)
    try:
        code = cli.main([command, "--config", path])
    except SystemExit as err:  # jsonargparse reports its own parse errors this way
        code = err.code
    captured = capsys.readouterr()
    assert code == 2, captured
    assert message in captured.err, captured.err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_unknown_model_name(tmp_path, capsys):
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"]["model"] = None
    config["model"]["init_args"]["model_name"] = "no-such-perceiver"
    _fails(tmp_path, capsys, config, "unknown model name 'no-such-perceiver'; registered models:")


def test_model_class_that_does_not_exist(tmp_path, capsys):
    model = {"class_path": "perceivers.NoSuchModel", "init_args": {}}
    _fails(tmp_path, capsys, tiny_config(tmp_path / "run", model=model), "NoSuchModel")


def test_labels_out_of_range_for_the_model(tmp_path, capsys):
    model = {**TINY_PERCEIVER, "init_args": {**TINY_PERCEIVER["init_args"], "num_classes": 5}}
    _fails(tmp_path, capsys, tiny_config(tmp_path / "run", model=model),
           "labels out of range: the data has 10 classes")


def test_image_size_the_model_cannot_take(tmp_path, capsys):
    model = {"class_path": "perceivers.models.patch.PatchPerceiver",
             "init_args": {"image_size": 16, "patch_size": 4, "input_channels": 1, "num_classes": 10,
                           "num_latents": 4, "latent_dim": 8, "latent_heads": 2, "num_blocks": 1}}
    _fails(tmp_path, capsys, tiny_config(tmp_path / "run", model=model), "cannot take the data's inputs")


def test_missing_data_folder(tmp_path, capsys):
    data = {"class_path": "perceivers.train.CIFARDataModule", "init_args": {"root": str(tmp_path / "nowhere")}}
    _fails(tmp_path, capsys, tiny_config(tmp_path / "run", data=data), "does not exist")


def test_unreadable_image_file(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    (root / "cat" / "truncated.jpg").write_bytes(b"\xff\xd8\xff")
    data = {"class_path": "perceivers.train.ImageFolderDataModule",
            "init_args": {"root": str(root), "load_size": 8, "channels": 1, "val_fraction": 0.25, "batch_size": 2}}
    _fails(tmp_path, capsys, tiny_config(tmp_path / "run", data=data), "truncated.jpg")


def test_image_folder_fit(tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    model = {**TINY_PERCEIVER, "init_args": {**TINY_PERCEIVER["init_args"], "input_channels": 3, "num_classes": 2}}
    data = {"class_path": "perceivers.train.ImageFolderDataModule",
            "init_args": {"root": str(root), "load_size": 8, "val_fraction": 0.25, "batch_size": 2,
                          "augment": {"flip": True, "crop_scale": [0.5, 1.0]}}}
    config = write_config(tmp_path / "img.yaml", tiny_config(tmp_path / "run", model=model, data=data))
    assert cli.main(["fit", "--config", config]) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()


def test_predict_writes_a_csv(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    assert cli.main(["fit", "--config", config]) == 0
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert cli.main(["predict", "--config", config, "--ckpt_path", ckpt, "--trainer.limit_predict_batches", "2"]) == 0
    rows = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,prediction,class,probability" and len(rows) == 1 + 2 * 64
    capsys.readouterr()


def test_quiet_dependencies_leaves_out_two_messages_only(caplog):
    from torch.utils._pytree import LeafSpec

    from perceivers.train.cli import quiet_dependencies

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    caplog.set_level(logging.INFO, logger=logger.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_dependencies():
            LeafSpec()  # torch's FutureWarning, raised inside Lightning's code
            warnings.warn("kept", FutureWarning, stacklevel=1)
            logger.info("💡 Tip: try our cloud")
            logger.info("kept too")
        LeafSpec()
    assert [str(w.message)[:16] for w in caught] == ["kept", "`isinstance(tree"]
    assert [r.getMessage() for r in caplog.records] == ["kept too"]
    assert not logger.filters


def test_trainer_setting_lightning_refuses_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    assert cli.main(["fit", "--config", config, "--trainer.devices", "0"]) == 2
    err = capsys.readouterr().err
    assert "perceivers fit: error: `Trainer(devices=" in err and "not a valid input" in err
    assert "Traceback" not in err


def test_optimizer_setting_torch_refuses_is_a_clear_error(tmp_path, capsys):
    """``lr -1`` ended in a traceback through torch.optim; it is one line naming the optimizer and its settings."""
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    assert cli.main(["fit", "--config", config, "--model.init_args.optimizer.init_args.lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "perceivers fit: error: optimizer AdamW(lr=-1.0" in err and "Invalid learning rate: -1.0" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("override", "expected"), [
    (["--data.init_args.batch_size", "abc"], "error: --data.init_args.batch_size: expected int, got abc\n"),
    (["--model.init_args.model.init_args.num_latents", "1.5"],
     "error: --model.init_args.model.init_args.num_latents: expected int, got 1.5\n"),
    (["--trainer.max_epochs", "abc"], "error: --trainer.max_epochs: expected int, got abc\n"),
    (["--model.init_args.lr", "0.1"],
     "error: --model.init_args.lr: not an option of perceivers.train.ClassificationTask\n"),
    (["--trainer.precision", "99"], "error: --trainer.precision: expected one of 64, 32, 16, 'transformer-engine'"),
])
def test_a_wrong_value_is_named_first(capsys, override, expected):
    """A value of the wrong type: the option, the type and the value on the error's first line, after a one-line
    usage (it came after the 73-line usage, in the 7th line of jsonargparse's account of every type it tried)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", "digits", *override])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    usage, tip, error = err.splitlines()[:3]
    assert usage.startswith("usage: ") and usage.endswith(" fit [options]") and "fit --help" in tip, err
    assert (error + "\n").startswith(expected), err
