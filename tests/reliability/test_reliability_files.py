"""Hostile and broken files: every loader refuses code-carrying pickles (the code never runs) and
truncated or corrupted files with a clear error naming the file; only ``weights_only`` loads exist.
"""

from __future__ import annotations

import ast
import json
import pickle
import zipfile
from pathlib import Path

import _files
import pytest
import torch

from perceivers import from_pretrained, load_checkpoint
from perceivers.commands import convert as convert_cmd
from perceivers.convert.haiku import HaikuCheckpointError, read_haiku_checkpoint
from perceivers.convert.state_dict import CheckpointError, read_state_dict, save_state_dict

SRC = Path(__file__).resolve().parents[2] / "src" / "perceivers"
CLEAR = (CheckpointError, HaikuCheckpointError, ValueError, TypeError, FileNotFoundError)


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return _files.make_valid(tmp_path_factory.mktemp("valid"))


@pytest.fixture
def fresh(valid, tmp_path):
    """A private copy of the valid files (tests damage them)."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(next(iter(valid.values())).parent, root)
    return {k: root / v.name for k, v in valid.items()}


@pytest.mark.parametrize("name", sorted(_files.LOADERS))
def test_valid_files_load(valid, name):
    load, spec = _files.LOADERS[name]
    assert _files.same_weights(load(valid), _files.model(spec))


# --------------------------------------------------------------------------------------------- code in pickles


@pytest.mark.parametrize("payload", sorted(_files.PAYLOADS))
def test_code_carrying_files_are_refused_and_never_run(tmp_path, payload):
    marker = tmp_path / "marker"
    files = _files.hostile_files(tmp_path, marker, _files.PAYLOADS[payload])
    model = _files.model()
    attempts = {
        "read_haiku_checkpoint": lambda: read_haiku_checkpoint(files["haiku"]),
        "load_checkpoint(haiku)": lambda: load_checkpoint(model, files["haiku"]),
        "read_state_dict(torch)": lambda: read_state_dict(files["torch"]),
        "load_checkpoint(torch)": lambda: load_checkpoint(model, files["torch"]),
        "load_checkpoint(torch-legacy)": lambda: load_checkpoint(model, files["torch-legacy"]),
        "load_checkpoint(lightning)": lambda: load_checkpoint(model, files["lightning"]),
        "from_pretrained(transformers)": lambda: from_pretrained(files["transformers"]),
        "load_checkpoint(pickle-as-bin)": lambda: load_checkpoint(model, files["pickle-as-bin"]),
    }
    for label, attempt in attempts.items():
        with pytest.raises(CLEAR) as info:
            attempt()
        message = str(info.value)
        assert "refus" in message or "unsafe" in message.lower(), f"{label}: {message}"
        assert not marker.exists(), f"{label} ran the payload"


def test_cli_refuses_code_carrying_files(tmp_path, capsys):
    marker = tmp_path / "marker"
    files = _files.hostile_files(tmp_path, marker, _files.RunsShell)
    for src, extra in ((files["haiku"], ["--model", "vision-perceiver-conv"]),
                       (files["torch"], ["--model", "vision-perceiver-conv"]),
                       (files["transformers"], [])):
        assert convert_cmd.main([str(src), str(tmp_path / "out"), *extra]) == 2
        assert "refus" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "builtins.eval", "pathlib.Path",
                                    "perceivers.hub.Path", "torch.nn.modules.module.torch.save"])
def test_own_config_cannot_name_arbitrary_classes(valid, tmp_path, target):
    import shutil

    directory = tmp_path / "ours"
    shutil.copytree(valid["perceivers"], directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["model"] = {"class": target, "kwargs": {"*args": ["touch " + str(tmp_path / "marker")]}}
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, TypeError, ImportError, AttributeError)):
        from_pretrained(directory)
    assert not (tmp_path / "marker").exists()


def test_only_weights_only_loads_in_the_library():
    """Every torch.load in src/ passes weights_only=True; no bare pickle.load / np.load(allow_pickle=True)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(SRC)}:{node.lineno} {name}"
            if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
                offenders.append(where)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load"):
                offenders.append(where)
            if name.endswith("np.load") and kwargs.get("allow_pickle") == "True":
                offenders.append(where)
    assert not offenders, offenders


def test_writers_prefer_safetensors(valid):
    """save_pretrained and save_transformers write safetensors (with our digest), never pickles."""
    for directory in (valid["perceivers"], valid["transformers"]):
        names = sorted(p.name for p in directory.iterdir())
        assert names == ["config.json", "model.safetensors"], names
        with open(directory / "model.safetensors", "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        assert "perceivers.sha256" in header["__metadata__"]


# --------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("name", sorted(_files.targets({k: Path(k) for k in _files.LOADERS})))
@pytest.mark.parametrize("damage", ["empty", "half", "flip"])
def test_damaged_files_fail_clearly(fresh, name, damage):
    """Truncated or corrupted → an error naming the file (never a raw pickle/zip/safetensors/JSON error).
    Byte flips in a checksummed format never load silently; in a Haiku pickle, flips inside array data
    are invisible (the format has no checksum) — allowed, but a structural flip must fail clearly."""
    target = _files.targets(fresh)[name]
    load, spec = _files.LOADERS[name]
    seeds = range(6) if damage == "flip" else [0]
    for seed in seeds:
        original = target.read_bytes()
        _files.damage(target, damage, seed)
        try:
            loaded = load(fresh)
        except CLEAR as e:
            assert target.name in str(e) or str(target.parent) in str(e), f"error does not name the file: {e}"
        else:
            assert damage == "flip", f"{name}: a {damage} file loaded"
            if name in _files.CHECKSUMMED or name.endswith("config"):
                assert _files.same_weights(loaded, _files.model(spec)), f"{name}: silently corrupted weights"
        finally:
            target.write_bytes(original)


def test_corrupted_tensor_payload_is_detected_by_digest(tmp_path):
    """A flip inside the tensor bytes of our safetensors (not the header) is caught by the SHA-256."""
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.arange(64, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_state_dict(path)


def test_torch_zip_payload_flip_is_detected_by_crc(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    off = info.header_offset  # local header: 30 bytes + file name + extra field (alignment padding)
    start = off + 30 + int.from_bytes(data[off + 26: off + 28], "little") + int.from_bytes(data[off + 28: off + 30], "little")
    data[start + 3] ^= 0x01  # inside the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        read_state_dict(path)


def test_haiku_truncated_mid_array(tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": {"w": torch.zeros(100).numpy()}})[:-40])
    with pytest.raises(HaikuCheckpointError, match=r"p\.pkl.*truncated or corrupt"):
        read_haiku_checkpoint(path)


def test_cli_reports_broken_inputs_without_tracebacks(valid, tmp_path, capsys):
    """``perceivers predict`` / ``convert``: unreadable images and damaged checkpoints → exit 2 and one line."""
    from PIL import Image

    from perceivers.commands import predict

    good = tmp_path / "good.png"
    Image.fromarray(torch.randint(0, 255, (20, 24, 3), dtype=torch.uint8).numpy()).save(good)
    garbage, truncated = tmp_path / "garbage.png", tmp_path / "truncated.png"
    garbage.write_bytes(b"not an image at all")
    truncated.write_bytes(good.read_bytes()[:60])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(valid["torch"].read_bytes()[:1000])
    runs = [
        (predict.main, [str(garbage), "--model", "vision-perceiver-conv"], "garbage.png"),
        (predict.main, [str(truncated), "--model", "vision-perceiver-conv"], "truncated.png"),
        (predict.main, [str(tmp_path / "missing.png"), "--model", "vision-perceiver-conv"], "missing.png"),
        (predict.main, [str(good), "--model", "vision-perceiver-conv", "--checkpoint", str(broken)], "broken.pt"),
        (convert_cmd.main, [str(broken), str(tmp_path / "out"), "--model", "vision-perceiver-conv"], "broken.pt"),
    ]
    for main, argv, name in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and name in err and "Traceback" not in err, err


def test_cifar_pickles_cannot_run_code(tmp_path):
    """The CIFAR reader unpickles numpy arrays and containers only."""
    import io

    import numpy as np

    from perceivers.safe_files import UnsafePickleError, load_numpy_pickle

    ok = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, protocol=2)
    assert load_numpy_pickle(io.BytesIO(ok), encoding="bytes")[b"labels"] == [1, 2]
    marker = tmp_path / "marker"
    for payload in _files.PAYLOADS.values():
        evil = pickle.dumps({b"data": payload(marker)}, protocol=2)
        with pytest.raises(UnsafePickleError, match="refusing"):
            load_numpy_pickle(io.BytesIO(evil), encoding="bytes")
    assert not marker.exists()
