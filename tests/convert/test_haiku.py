"""perceivers.convert.haiku: restricted unpickling, both top-level layouts, strict key tables."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from perceivers import create_model
from perceivers.convert.haiku import (
    HaikuCheckpointError,
    UnsafeCheckpointError,
    haiku_key_table,
    haiku_to_state_dict,
    load_haiku_checkpoint,
    read_haiku_checkpoint,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "haiku"
FOURIER = {"num_latents": 20, "d_latents": 96, "num_blocks": 3, "num_self_attends_per_block": 3, "num_labels": 23,
               "num_bands": 10, "max_resolution": (28, 20), "image_size": (28, 20)}


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _WritesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_RunsShell, _WritesFile])
@pytest.mark.parametrize("wrap", ["bare", "nested"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path, payload, wrap: str) -> None:
    marker = tmp_path / "marker"
    obj = payload(marker)
    if wrap == "nested":  # hidden inside an otherwise valid checkpoint
        obj = {"params": {"embed": {"embeddings": np.zeros((2, 2), np.float32), "evil": obj}}, "state": {}}
    path = tmp_path / "evil.pystate"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os|nt|builtins)\.(system|eval)"):
        read_haiku_checkpoint(path)
    model = create_model("vision-perceiver-fourier", tiny=True)
    with pytest.raises(UnsafeCheckpointError):
        load_haiku_checkpoint(model, path)
    assert not marker.exists()


def test_self_referencing_pickle_names_the_file(tmp_path: Path) -> None:
    tree: dict = {"params": {}}
    tree["params"]["loop"] = tree  # a mapping that contains itself: no end to descend
    path = tmp_path / "loop.pkl"
    path.write_bytes(pickle.dumps(tree, protocol=4))
    with pytest.raises(HaikuCheckpointError, match=r"loop\.pkl: checkpoint entry 'params/loop/params/.*"
                                                  r"nests mappings more than 32 deep, expected a shallow tree"):
        read_haiku_checkpoint(path)
    with pytest.raises(HaikuCheckpointError, match="the given bytes: .*more than 32 deep"):
        read_haiku_checkpoint(path.read_bytes())


def test_unknown_class_is_refused() -> None:
    blob = pickle.dumps({"a": {"w": io.BytesIO(b"x")}})
    with pytest.raises(UnsafeCheckpointError, match=r"_io\.BytesIO|io\.BytesIO"):
        read_haiku_checkpoint(blob)


@pytest.fixture
def fake_haiku(monkeypatch):
    """Stand-ins for haiku's mapping classes, registered under haiku's module path only while pickling."""
    import sys
    import types

    classes = {}
    for name in ("FlatMapping", "frozendict"):
        cls = type(name, (), {"__module__": "haiku._src.data_structures"})
        classes[name] = cls
    for mod in ("haiku", "haiku._src", "haiku._src.data_structures"):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    for name, cls in classes.items():
        setattr(sys.modules["haiku._src.data_structures"], name, cls)
    return classes


class _Mapping(dict):
    """Pickles as ``haiku_cls(dict(self))``, which is how haiku pickles FlatMapping and frozendict."""

    def __init__(self, haiku_cls, *args):
        super().__init__(*args)
        self.haiku_cls = haiku_cls

    def __reduce__(self):
        return self.haiku_cls, (dict(self),)


@pytest.mark.parametrize("protocol", [2, 4])
def test_haiku_mapping_classes_and_bare_layout(fake_haiku, protocol: int) -> None:
    params = read_haiku_checkpoint(DATA / "optical_flow" / "params.pkl")  # bare params dict
    modules: dict = {}
    for key, value in params.items():
        module, name = key.rsplit("/", 1)
        modules.setdefault(module, _Mapping(fake_haiku["frozendict"]))[name] = value
    blob = pickle.dumps(_Mapping(fake_haiku["FlatMapping"], modules), protocol=protocol)
    assert b"FlatMapping" in blob and b"frozendict" in blob
    flat = read_haiku_checkpoint(blob)
    assert flat.keys() == params.keys()
    for key in params:
        np.testing.assert_array_equal(flat[key], params[key])


def test_params_state_layout_merges_bn_state() -> None:
    flat = read_haiku_checkpoint(DATA / "imagenet_conv" / "params.pkl")
    ema = "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema"
    assert flat[f"{ema}/average"].shape == (1, 1, 1, 64)
    assert f"{ema}/counter" in flat and f"{ema}/hidden" in flat


def test_key_table_lists_transposes() -> None:
    model = create_model("vision-perceiver-conv", tiny=True)
    rules = {r.haiku: r for r in haiku_key_table(model)}
    conv = rules["image_preprocessor/~/conv2_d_downsample/~/conv/w"]
    assert conv.transform == "conv" and conv.ours.endswith("stem.layers.0.conv.weight")
    assert rules["perceiver_encoder/~/cross_attention/attention/linear/w"].transform == "linear"
    assert rules["image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/var_ema/average"].ours.endswith("running_var")
    assert rules["image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/var_ema/hidden"].ours is None


def test_strict_errors_name_the_keys() -> None:
    flat = read_haiku_checkpoint(DATA / "imagenet_fourier" / "params.pkl")
    model = create_model("vision-perceiver-fourier", **FOURIER)
    haiku_to_state_dict(flat, model)  # fits

    broken = dict(flat)
    del broken["perceiver_encoder/~/self_attention_2/mlp/linear_1/b"]
    broken["some_module/extra"] = np.zeros(3, np.float32)
    broken["classification_decoder/~/basic_decoder/output/w"] = np.zeros((96, 7), np.float32)
    with pytest.raises(HaikuCheckpointError) as err:
        haiku_to_state_dict(broken, model)
    msg = str(err.value)
    assert "perceiver_encoder/~/self_attention_2/mlp/linear_1/b" in msg and "self_attends.2.mlp.fc2.bias" in msg
    assert "some_module/extra" in msg
    assert "classification_decoder/~/basic_decoder/output/w" in msg and "(23, 96)" in msg

    smaller = create_model("vision-perceiver-fourier", **dict(FOURIER, num_self_attends_per_block=2))
    with pytest.raises(HaikuCheckpointError, match="self_attention_2"):
        load_haiku_checkpoint(smaller, flat)


def test_load_is_in_place_and_exact() -> None:
    flat = read_haiku_checkpoint(DATA / "imagenet_conv" / "params.pkl")
    model = create_model("vision-perceiver-conv", **dict(FOURIER, max_resolution=(9, 13), image_size=(36, 52)))
    assert load_haiku_checkpoint(model, flat) is model
    w = flat["image_preprocessor/~/conv2_d_downsample/~/conv/w"]  # HWIO
    got = model.perceiver.input_preprocessor.stem.layers[0].conv.weight  # OIHW
    assert torch.equal(got[5, 2, 1, 4], torch.tensor(w[1, 4, 2, 5]))
    bn = model.perceiver.input_preprocessor.stem.layers[0].norm
    ema = flat["image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/var_ema/average"]
    assert torch.equal(bn.running_var, torch.from_numpy(ema.reshape(-1)))


def test_unsupported_model_type() -> None:
    with pytest.raises(TypeError, match="no Haiku key table"):
        haiku_key_table(torch.nn.Linear(2, 2))
