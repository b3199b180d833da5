"""A `perceivers fit` checkpoint is a model: from_pretrained rebuilds it from the settings it records, and
predict / convert / export take it as --checkpoint."""

from __future__ import annotations

import pytest
import torch
from train_configs import tiny_config, write_config

from perceivers import cli, from_pretrained
from perceivers.hub import fit_checkpoint_config
from perceivers.models import Perceiver
from perceivers.train import Task


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    no_plots = {"attention": False, "learning_curves": False}
    config = write_config(root / "tiny.yaml", tiny_config(root / "run", plots=no_plots))
    assert cli.main(["fit", "--config", config]) == 0
    return root / "run" / "checkpoints" / "last.ckpt"


def test_from_pretrained_rebuilds_the_trained_model(run_checkpoint) -> None:
    model = from_pretrained(run_checkpoint)
    trained = Task.load_from_checkpoint(run_checkpoint, map_location="cpu").model.eval()
    assert type(model) is Perceiver and not model.training
    x = torch.randn(3, 8, 8, 1)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_convert_and_export_take_it(run_checkpoint, tmp_path, capsys) -> None:
    assert cli.main(["convert", str(run_checkpoint), str(tmp_path / "model")]) == 0
    x = torch.randn(2, 8, 8, 1)
    want = from_pretrained(run_checkpoint)(x)
    torch.testing.assert_close(from_pretrained(tmp_path / "model")(x), want, atol=0, rtol=0)
    assert cli.main(["export", str(tmp_path / "m.pt2"), "--checkpoint", str(run_checkpoint),
                     "--input-shape", "1,8,8,1"]) == 0
    assert "dynamic: batch and size" in capsys.readouterr().out
    program = torch.export.load(tmp_path / "m.pt2").module()
    for shape in ((2, 8, 8, 1), (5, 6, 7, 1)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program(x), from_pretrained(run_checkpoint)(x), atol=1e-5, rtol=1e-5)


def test_recorded_settings(tmp_path) -> None:
    state = {"model.latents": torch.zeros(2)}
    registry = {"state_dict": state, "hyper_parameters": {"model_name": "vision-perceiver-fourier",
                                                          "model_kwargs": {"tiny": True}}}
    torch.save(registry, tmp_path / "registry.ckpt")
    assert fit_checkpoint_config(tmp_path / "registry.ckpt") == {"registry": "vision-perceiver-fourier",
                                                                  "config": {"tiny": True}}
    nested = {"class_path": "perceivers.A", "init_args": {"b": {"class_path": "perceivers.B", "init_args": {"n": 1}},
                                                          "c": [1, 2], "d": {"k": 1}}}
    torch.save({"state_dict": state, "hyper_parameters": {"model": nested}}, tmp_path / "nested.ckpt")
    assert fit_checkpoint_config(tmp_path / "nested.ckpt") == {
        "class": "perceivers.A",
        "kwargs": {"b": {"__module__": {"class": "perceivers.B", "kwargs": {"n": 1}}}, "c": [1, 2],
                   "d": {"__dict__": {"k": 1}}}}
    torch.save(state, tmp_path / "bare.pt")
    assert fit_checkpoint_config(tmp_path / "bare.pt") is None  # a state dict, not a run


def test_refusals(tmp_path) -> None:
    state = {"model.latents": torch.zeros(2)}
    outside = {"class_path": "os.system", "init_args": {"command": "echo hi"}}
    torch.save({"state_dict": state, "hyper_parameters": {"model": outside}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing to import 'os.system'"):
        from_pretrained(tmp_path / "evil.ckpt")
    torch.save({"state_dict": state, "hyper_parameters": {"model": None, "model_name": None}}, tmp_path / "py.ckpt")
    with pytest.raises(ValueError, match="model was given as a Python object"):
        from_pretrained(tmp_path / "py.ckpt")
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="use load_checkpoint"):
        from_pretrained(tmp_path / "bare.pt")
