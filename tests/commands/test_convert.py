"""`perceivers convert` and checkpoint formats: Haiku pickles (official layout), transformers, ours and bare
state dicts of the same tiny model all load and give identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
from _haiku_writer import write_haiku_pickle

from perceivers import from_pretrained, load_checkpoint, save_pretrained
from perceivers.commands import convert
from perceivers.convert.state_dict import save_state_dict
from perceivers.convert.transformers import from_transformers, save_transformers
from perceivers.tasks import create_model

# tiny variants whose sizes transformers can also express (it hard-codes several)
MODELS = {
    "optical-flow-perceiver": {"tiny": True, "num_bands": 64, "preprocessor_channels": 64},
    "language-perceiver": {"tiny": True, "num_decoder_heads": 8, "decoder_qk_channels": 256,
                           "decoder_v_channels": 16},
    "vision-perceiver-conv": {"tiny": True, "image_size": 224, "preprocessor_channels": 64, "num_bands": 64,
                              "max_resolution": (56, 56)},
    "vision-perceiver-learned": {"tiny": True, "image_size": 4, "preprocessor_channels": 256,
                                 "position_channels": 256, "project_pos_dim": 256},
}


def _model(name):
    torch.manual_seed(3)
    model = create_model(name, **MODELS[name]).eval()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.abs_().add_(0.5)
    return model


def _inputs(name):
    g = torch.Generator().manual_seed(5)
    if name == "optical-flow-perceiver":
        return (torch.randn(1, 2, 27, 6, 8, generator=g),), {}
    if name == "language-perceiver":
        return (torch.randint(0, 262, (2, 16), generator=g),), {}
    if name == "vision-perceiver-conv":
        return (torch.randn(1, 3, 32, 28, generator=g),), {}
    return (torch.randn(2, 3, 4, 4, generator=g),), {}


def _out(model, name):
    args, kwargs = _inputs(name)
    with torch.no_grad():
        return model.eval()(*args, **kwargs).logits


def _config(name):
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in MODELS[name].items()})


@pytest.fixture(params=list(MODELS))
def checkpoints(request, tmp_path):
    """One tiny model written in every format: (name, model, {format: path})."""
    name = request.param
    model = _model(name)
    paths = {
        "haiku": write_haiku_pickle(model, tmp_path / "model.pystate"),
        "transformers": save_transformers(model, tmp_path / "hf"),
        "perceivers": save_pretrained(model, tmp_path / "ours"),
        "safetensors": tmp_path / "weights.safetensors",
        "torch": tmp_path / "weights.pt",
    }
    save_state_dict(model.state_dict(), paths["safetensors"])
    torch.save(model.state_dict(), paths["torch"])
    return name, model, paths


def test_every_format_loads_to_identical_outputs(checkpoints):
    name, model, paths = checkpoints
    want = _out(model, name)
    for fmt, path in paths.items():
        fresh = create_model(name, **MODELS[name])
        load_checkpoint(fresh, path)
        assert torch.equal(_out(fresh, name), want), fmt
    assert torch.equal(_out(from_pretrained(paths["perceivers"]), name), want)
    assert torch.equal(_out(from_transformers(paths["transformers"]), name), want)


def test_convert_command_from_every_format(checkpoints, tmp_path, capsys):
    name, model, paths = checkpoints
    want = _out(model, name)
    for fmt, path in paths.items():
        dst = tmp_path / f"out-{fmt}"
        extra = [] if fmt in ("perceivers", "transformers") else ["--model", name, "--config", _config(name)]
        assert convert.main([str(path), str(dst), *extra]) == 0, capsys.readouterr().err
        assert "wrote " + name in capsys.readouterr().out
        assert torch.equal(_out(from_pretrained(dst), name), want), fmt


def test_convert_to_transformers_format(checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    name, model, paths = checkpoints
    dst = tmp_path / "to-hf"
    assert convert.main([str(paths["perceivers"]), str(dst), "--to", "transformers"]) == 0
    assert torch.equal(_out(from_transformers(dst), name), _out(model, name))
    cfg = json.loads((dst / "config.json").read_text())
    hf = getattr(transformers, cfg["architectures"][0]).from_pretrained(dst).eval()
    original = getattr(transformers, cfg["architectures"][0]).from_pretrained(paths["transformers"]).eval()
    args, _ = _inputs(name)
    with torch.no_grad():
        assert torch.equal(hf(args[0]).logits, original(args[0]).logits)


def test_convert_errors(tmp_path, capsys):
    model = _model("optical-flow-perceiver")
    pickle_path = write_haiku_pickle(model, tmp_path / "flow.pystate")
    assert convert.main([str(pickle_path), str(tmp_path / "a")]) == 2
    assert "pass --model" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert convert.main([str(pickle_path), str(tmp_path / "full"), "--model", "optical-flow-perceiver"]) == 2
    assert "not empty" in capsys.readouterr().err
    # official sizes do not fit the tiny pickle: the strict loader names the tensors
    assert convert.main([str(pickle_path), str(tmp_path / "b"), "--model", "optical-flow-perceiver"]) == 2
    assert "perceiver_encoder/~/trainable_position_encoding/pos_embs" in capsys.readouterr().err
    small = save_pretrained(create_model("vision-perceiver-fourier", tiny=True), tmp_path / "fourier")
    assert convert.main([str(small), str(tmp_path / "c"), "--to", "transformers"]) == 2
    assert "transformers fixes" in capsys.readouterr().err


def test_convert_has_no_checkpoint_option(tmp_path, capsys):
    """The checkpoint is SRC; `--checkpoint` is not offered (predict keeps it)."""
    from perceivers.commands import predict

    assert "--checkpoint" not in convert.build_parser().format_help()
    assert "--checkpoint" in predict.build_parser().format_help()
    src = save_pretrained(_model("optical-flow-perceiver"), tmp_path / "ours")
    with pytest.raises(SystemExit) as info:
        convert.main([str(src), str(tmp_path / "out"), "--checkpoint", str(src)])
    assert info.value.code == 2
    assert "unrecognized arguments: --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("force", [False, True])
def test_convert_destination_is_a_file(tmp_path, capsys, force):
    src = save_pretrained(_model("optical-flow-perceiver"), tmp_path / "ours")
    dst = tmp_path / "existing.png"
    dst.write_bytes(b"png")
    for target in (dst, dst / "sub"):
        assert convert.main([str(src), str(target), *(["--force"] if force else [])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("perceivers convert: error: ") and f"{dst}" in err
        assert "is a file, not a directory" in err and "not empty" not in err
    assert dst.read_bytes() == b"png"


def test_convert_missing_relative_source(tmp_path, capsys, monkeypatch):
    """A missing `owner/name`-shaped SRC: one error line naming it, not a local path, Hub fetch failed (why)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):  # what snapshot_download raises without a network (no test goes online)
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    assert convert.main(["runs/nosuch", "out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("perceivers convert: error: ")
    assert "'runs/nosuch' is not an existing local path" in err
    assert "fetching Hub repo 'runs/nosuch' failed" in err and "Cannot find an appropriate cached snapshot" in err
    assert convert.main(["./runs/nosuch", "out"]) == 2
    assert "neither an existing path nor a Hub repo id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_keeps_the_dtype(tmp_path, capsys):
    """A bfloat16 checkpoint converts to a bfloat16 one, both ways (it used to come out in float32)."""
    model = _model("optical-flow-perceiver").to(torch.bfloat16)
    save_pretrained(model, tmp_path / "ours")
    assert convert.main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "transformers"]) == 0
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = from_pretrained(tmp_path / "back")
    assert {t.dtype for t in back.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
