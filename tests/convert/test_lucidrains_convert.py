"""perceivers.convert.from_lucidrains: key layouts of perceiver-pytorch 0.8–0.11, tying, errors.

Old releases (0.8.8, 0.10.1) cannot share an environment with 0.11.0 (same import name), so
``make setup`` installs them into ``.venv/refs/perceiver-pytorch-<version>``. Each is run in a
subprocess that builds seeded models with randomised parameters and saves their state dicts, inputs
and outputs; the test converts those state dicts, loads them strictly and compares outputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import perceivers
from perceivers.convert import detect_family, from_lucidrains

REFS = Path(sys.prefix) / "refs"
OLD_VERSIONS = ("0.8.8", "0.10.1")

# A script run by the old release: build, randomise, run, save. Kept free of test-module imports.
_SCRIPT = r"""
import importlib.metadata, json, sys
import torch
from torch import nn
import perceiver_pytorch as lr

folder, out_path, version, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
assert lr.__file__.startswith(folder), f"imported {lr.__file__}, not the copy in {folder}"
assert importlib.metadata.version("perceiver-pytorch") == version
torch.set_num_threads(1)

def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                noise = torch.randn(p.shape, generator=gen)
                if name == "bias":
                    p.copy_(0.3 * noise)
                elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                    p.copy_(1 + 0.3 * noise)
                elif isinstance(mod, nn.Linear):
                    p.copy_(noise / p.shape[1] ** 0.5)
                else:
                    p.copy_(noise)

results = {}
for name, case in cases.items():
    torch.manual_seed(case["seed"])
    model = getattr(lr, case["family"])(**case["kwargs"]).eval()
    randomize(model, case["seed"])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    b, *axes = case["shape"]
    if case["family"] == "PerceiverLM":
        data = torch.randint(0, case["kwargs"]["num_tokens"], case["shape"], generator=gen)
    else:
        data = torch.randn(*case["shape"], case["channels"], generator=gen)
    mask = None
    if case["mask"]:
        mask = torch.rand(b, *axes, generator=gen) > 0.4
        mask.view(b, -1)[:, 0] = True
    inputs = {"data": data, "mask": mask}
    kwargs = {"mask": mask}
    if case.get("queries"):
        inputs["queries"] = kwargs["queries"] = torch.randn(*case["queries"], generator=gen)
    with torch.no_grad():
        out = model(data, **kwargs)
    results[name] = {"state_dict": model.state_dict(), "inputs": inputs, "output": out}
torch.save({"version": version, "cases": results}, out_path)
"""

_P = {
    "num_freq_bands": 3,
    "depth": 3,
    "max_freq": 8.0,
    "input_channels": 3,
    "input_axis": 2,
    "num_latents": 6,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
    "num_classes": 5,
}
_IO = {
    "depth": 2,
    "dim": 10,
    "queries_dim": 12,
    "logits_dim": 7,
    "num_latents": 6,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}
_LM = {
    "num_tokens": 11,
    "dim": 12,
    "max_seq_len": 10,
    "depth": 2,
    "num_latents": 5,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}

# name → (oldest version that has the options, case spec)
OLD_CASES = {
    "perceiver": (
        "0.8.8",
        {
            "family": "Perceiver",
            "kwargs": dict(_P, self_per_cross_attn=2),
            "shape": [2, 5, 4],
            "channels": 3,
            "mask": True,
        },
    ),
    "perceiver_tied": (
        "0.8.8",
        {
            "family": "Perceiver",
            "kwargs": dict(_P, self_per_cross_attn=2, weight_tie_layers=True),
            "shape": [2, 5, 4],
            "channels": 3,
            "mask": True,
        },
    ),
    "perceiver_1d_no_fourier": (
        "0.8.8",
        {
            "family": "Perceiver",
            "kwargs": dict(_P, input_axis=1, input_channels=4, fourier_encode_data=False, cross_heads=2),
            "shape": [2, 7],
            "channels": 4,
            "mask": False,
        },
    ),
    "perceiver_no_head": (
        "0.8.8",
        {
            "family": "Perceiver",
            "kwargs": dict(_P, final_classifier_head=False),
            "shape": [2, 5, 4],
            "channels": 3,
            "mask": False,
        },
    ),
    "perceiver_attn_residual": (
        "0.10.0",
        {
            "family": "Perceiver",
            "kwargs": dict(
                _P, attn_residual=True, attn_residual_rank=4, inverted_cross_attn=[True, False, True]
            ),
            "shape": [2, 5, 4],
            "channels": 3,
            "mask": True,
        },
    ),
    "perceiver_attn_residual_tied": (
        "0.10.0",
        {
            "family": "Perceiver",
            "kwargs": dict(
                _P, attn_residual=True, attn_residual_rank=4, weight_tie_layers=True, self_per_cross_attn=2
            ),
            "shape": [2, 5, 4],
            "channels": 3,
            "mask": False,
        },
    ),
    "io": (
        "0.8.8",
        {
            "family": "PerceiverIO",
            "kwargs": dict(_IO, decoder_ff=True),
            "shape": [2, 9],
            "channels": 10,
            "mask": True,
            "queries": [4, 12],
        },
    ),
    "io_tied": (
        "0.8.8",
        {
            "family": "PerceiverIO",
            "kwargs": dict(_IO, weight_tie_layers=True, depth=3),
            "shape": [2, 9],
            "channels": 10,
            "mask": False,
            "queries": [2, 4, 12],
        },
    ),
    "io_attn_residual": (
        "0.10.0",
        {
            "family": "PerceiverIO",
            "kwargs": dict(_IO, attn_residual=True, attn_residual_rank=4, inverted_cross_attn=True),
            "shape": [2, 9],
            "channels": 10,
            "mask": True,
            "queries": [4, 12],
        },
    ),
    "lm": ("0.8.8", {"family": "PerceiverLM", "kwargs": _LM, "shape": [2, 8], "mask": True}),
    "lm_tied": (
        "0.8.8",
        {
            "family": "PerceiverLM",
            "kwargs": dict(_LM, weight_tie_layers=True),
            "shape": [2, 8],
            "mask": False,
        },
    ),
}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _cases_for(version: str) -> dict[str, dict]:
    return {
        name: dict(spec, seed=10 + i)
        for i, (name, (since, spec)) in enumerate(OLD_CASES.items())
        if _version_tuple(version) >= _version_tuple(since)
    }


_GENERATED: dict[str, dict] = {}


def _generate(version: str, tmp_dir: Path) -> dict:
    """Run the old release once per test session and load what it saved."""
    if version in _GENERATED:
        return _GENERATED[version]
    folder = REFS / f"perceiver-pytorch-{version}"
    if not (folder / "perceiver_pytorch").is_dir():
        pytest.skip(
            f"perceiver-pytorch {version} is not installed in {folder} (run `make setup`, which installs "
            f"the old references with `pip install --target`)"
        )
    out_path = tmp_dir / f"perceiver-pytorch-{version}.pt"
    env = {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(folder), str(out_path), version, json.dumps(_cases_for(version))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"perceiver-pytorch {version} script failed:\n{proc.stderr[-3000:]}"
    _GENERATED[version] = torch.load(out_path, weights_only=True)
    return _GENERATED[version]


@pytest.fixture(scope="module")
def old_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("old_perceiver_pytorch")


@pytest.mark.parametrize(
    ("version", "name"),
    [(v, n) for v in OLD_VERSIONS for n in _cases_for(v)],
)
def test_old_layout_converts(version, name, old_tmp):
    saved = _generate(version, old_tmp)
    assert saved["version"] == version
    case = _cases_for(version)[name]
    result = saved["cases"][name]
    sd = result["state_dict"]
    # The saved keys really are the pre-0.11 layout.
    if case["family"] == "Perceiver":
        assert any(re.match(r"layers\.\d+\.0\.fn\.to_kv\.weight$", k) for k in sd), sorted(sd)[:5]
    else:
        assert any(".cross_attend_blocks.0." in f".{k}" for k in sd), sorted(sd)[:5]

    kwargs = dict(case["kwargs"])
    if isinstance(kwargs.get("inverted_cross_attn"), list):
        kwargs["inverted_cross_attn"] = tuple(kwargs["inverted_cross_attn"])
    ours = getattr(perceivers, case["family"])(**kwargs).eval()
    ours.load_state_dict(from_lucidrains(sd), strict=True)
    inputs = result["inputs"]
    extra = {"queries": inputs["queries"]} if "queries" in inputs else {}
    with torch.no_grad():
        out = ours(inputs["data"], mask=inputs["mask"], **extra)
    assert out.shape == result["output"].shape
    err = (out - result["output"]).abs().max().item()
    print(f"perceiver-pytorch {version} {name}: max output difference {err:.2e}")
    assert err <= 1e-5, f"perceiver-pytorch {version} {name}: max output difference {err:.3g}"


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_old_tied_layout_folds_without_shared_storage(version, old_tmp):
    """A tied checkpoint whose tensors were copied apart still folds into perceivers' unique blocks."""
    saved = _generate(version, old_tmp)
    sd = {k: v.clone() for k, v in saved["cases"]["perceiver_tied"]["state_dict"].items()}
    converted = from_lucidrains(sd)
    blocks = {k.split(".")[1] for k in converted if k.startswith("blocks.")}
    assert blocks == {"0", "1"}
    # perceiver-pytorch 0.8 ties per self-attention index (key=block_ind): the two inside a block differ.
    a, b = (
        converted["blocks.1.self_attns.0.attn.to_q.weight"],
        converted["blocks.1.self_attns.1.attn.to_q.weight"],
    )
    assert not torch.equal(a, b)


# ---- 0.11 layout: unit checks of the converter ------------------------------------------------------------

try:
    import perceiver_pytorch as ref
except ImportError:  # the old-layout tests above do not need it
    ref = None
needs_011 = pytest.mark.skipif(ref is None, reason="perceiver-pytorch 0.11 (test extra) is not installed")


@needs_011
def test_detect_family():
    assert detect_family(ref.Perceiver(**_P).state_dict()) == "Perceiver"
    assert detect_family(ref.PerceiverIO(**_IO).state_dict()) == "PerceiverIO"
    assert detect_family(ref.PerceiverLM(**_LM).state_dict()) == "PerceiverLM"
    with pytest.raises(ValueError, match="not a perceiver-pytorch state dict"):
        detect_family({"weight": torch.zeros(1)})


@needs_011
def test_fused_kv_is_split_in_order(randomize):
    model = randomize(ref.Perceiver(**_P), 3)
    sd = model.state_dict()
    converted = from_lucidrains(sd)
    kv = sd["layers.0.cross_attn.fn.to_kv.weight"]
    inner = kv.shape[0] // 2
    assert torch.equal(converted["blocks.0.cross_attn.attn.to_k.weight"], kv[:inner])
    assert torch.equal(converted["blocks.0.cross_attn.attn.to_v.weight"], kv[inner:])
    assert torch.equal(converted["head.proj.weight"], sd["to_logits.2.weight"])
    assert torch.equal(converted["head.norm.bias"], sd["to_logits.1.bias"])


@needs_011
@pytest.mark.parametrize("copy_apart", [False, True], ids=["shared_storage", "copied"])
def test_tied_perceiver_is_stored_once(randomize, copy_apart):
    model = randomize(ref.Perceiver(**dict(_P, depth=4, weight_tie_layers=True)), 4)
    sd = model.state_dict()
    if copy_apart:
        sd = {k: v.clone() for k, v in sd.items()}
    converted = from_lucidrains(sd)
    assert {k.split(".")[1] for k in converted if k.startswith("blocks.")} == {"0", "1"}
    ours = perceivers.Perceiver(**dict(_P, depth=4, weight_tie_layers=True))
    ours.load_state_dict(converted, strict=True)
    assert ours.block_order == (0, 1, 1, 1)
    n_ref = sum(p.numel() for p in model.parameters())  # .parameters() de-duplicates shared tensors
    assert sum(p.numel() for p in ours.parameters()) == n_ref


@needs_011
def test_tied_io_shares_every_layer(randomize):
    kwargs = dict(_IO, depth=3, weight_tie_layers=True)
    converted = from_lucidrains(randomize(ref.PerceiverIO(**kwargs), 5).state_dict())
    assert {k.split(".")[1] for k in converted if k.startswith("blocks.")} == {"0"}
    ours = perceivers.PerceiverIO(**kwargs)
    ours.load_state_dict(converted, strict=True)
    assert ours.block_order == (0, 0, 0)


@needs_011
def test_untied_layers_with_equal_values_stay_apart():
    """Default-initialised LayerNorms are equal across layers; linear weights differ, so nothing folds."""
    converted = from_lucidrains(ref.Perceiver(**_P).state_dict())
    perceivers.Perceiver(**_P).load_state_dict(converted, strict=True)


@needs_011
def test_unknown_key_is_named():
    sd = dict(ref.Perceiver(**_P).state_dict())
    sd["layers.0.cross_attn.fn.extra.weight"] = torch.zeros(2)
    with pytest.raises(KeyError, match=r"layers\.0\.cross_attn\.fn\.extra\.weight"):
        from_lucidrains(sd)
    sd = dict(ref.PerceiverLM(**_LM).state_dict())
    sd["something_else"] = torch.zeros(2)
    with pytest.raises(KeyError, match="something_else"):
        from_lucidrains(sd)


@needs_011
def test_converted_model_loads_only_with_matching_kwargs():
    converted = from_lucidrains(ref.Perceiver(**_P).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        perceivers.Perceiver(**dict(_P, latent_dim=32)).load_state_dict(converted, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        perceivers.Perceiver(**dict(_P, depth=4)).load_state_dict(converted, strict=True)


@needs_011
@pytest.mark.parametrize("kwargs", [
    {"dim": 16, "context_dim": 10, "cross_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8, "self_per_cross_attn": 2},
    {"dim": 16, "queries_contribute_kv": True, "latent_dim_head": 8},
    {"dim": 16, "has_cross_attn": False, "latent_dim_head": 8},
])
def test_perceiver_block_converts(randomize, kwargs):
    block = randomize(ref.PerceiverBlock(**kwargs), 5).eval()
    assert detect_family(block.state_dict()) == "PerceiverBlock"
    ours = perceivers.PerceiverBlock(**kwargs).eval()
    ours.load_state_dict(from_lucidrains(block.state_dict()), strict=True)
    x = torch.randn(2, 6, 16)
    context = None if kwargs.get("has_cross_attn") is False else torch.randn(2, 9, kwargs.get("context_dim", 16))
    mask = None if context is None else torch.rand(2, 9) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(ours(x, context, mask=mask), block(x, context, mask=mask), rtol=1e-5, atol=1e-5)


@needs_011
@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_model_state_dicts_convert(randomize, wrapper):
    """Saved from inside DistributedDataParallel / DataParallel or torch.compile: the prefix is removed."""
    model = randomize(ref.Perceiver(**_P), 6).eval()
    wrapped = {wrapper + k: v for k, v in model.state_dict().items()}
    assert detect_family(wrapped) == "Perceiver"
    assert from_lucidrains(wrapped).keys() == from_lucidrains(model.state_dict()).keys()
    ours = perceivers.Perceiver(**_P).eval()
    ours.load_state_dict(from_lucidrains(wrapped), strict=True)
    x = torch.randn(2, 8, 8, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)


def test_unknown_state_dict_names_what_came():
    with pytest.raises(ValueError, match=r"2 keys such as 'encoder.weight', 'weight'"):
        detect_family({"weight": torch.zeros(1), "encoder.weight": torch.zeros(1)})
