"""Parity of ``perceivers.flash_perceiver`` with kklemon's FlashPerceiver 0.2.0 (flash-attn 2.8.3.post2).

``_flash_perceiver_reference.py`` runs the real package in a subprocess once per module (it needs
stand-ins for flash-attn's CUDA extension, torchvision and triton; see its docstring): tiny seeded
``Perceiver``/``PerceiverIO`` models with every parameter randomised, their outputs, attention weights,
a seeded training forward with latent drop, gradients, and the utilities' outputs. Here each state dict
loads into our class strictly (the key lists must be equal, in order) and the numbers must agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceivers import flash_perceiver as fp
from perceivers.layers import native_attention, onednn_attention, onednn_enabled

REF = Path(sys.prefix) / "refs" / "flash-perceiver-0.2.0" / "flash_perceiver"
SCRIPT = Path(__file__).with_name("_flash_perceiver_reference.py")
CASES = [  # as _flash_perceiver_reference.cases()
    "average_gated_mask", "concat_plain_mlp_two_self", "first_tied_zero_tokens", "list_inputs_weights",
    "latents_2d_no_learned", "latents_3d_embeddings", "rotary_heads_none_weights", "latent_drop_train",
    "gradients", "long_inputs_grad", "io_queries_2d_proj", "io_queries_3d_plain_weights", "io_no_queries_tied", "io_grad",
]
TOL = 1e-5
GRAD_RTOL = 1e-5  # gradients (sums over batch and tokens): |diff| <= GRAD_RTOL * max(1, max |reference|)
# A sample whose keys are all masked: FlashPerceiver adds -10000 to every score in float32, which rounds the
# scores to ~1e-3; we attend all keys with the exact scores (the value its softmax approximates).
FULLY_MASKED_TOL = 2e-3

pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"{REF.parent} missing (make setup installs it)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("flash_perceiver")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "DONE" in proc.stdout, proc.stderr[-3000:]
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in [*CASES, "utilities"]}


def _ours(ref: dict) -> torch.nn.Module:
    model = getattr(fp, ref["cls"])(**ref["kwargs"])
    model.load_state_dict(ref["state"], strict=True)
    return model.train(ref["mode"] == "train")


def _run(model: torch.nn.Module, ref: dict, inputs: dict | None = None):
    torch.manual_seed(ref["seed"])  # latent drop: the same multinomial draws as the reference
    return model(**(inputs or ref["inputs"]), **ref["fwd"])


def _fully_masked(ref: dict) -> torch.Tensor:
    """Samples [B] whose keys are all masked out in some cross-attention (without zero tokens)."""
    masks = ref["inputs"].get("mask")
    masks = masks if isinstance(masks, list) else [masks]
    batch = ref["out"].shape[0]
    full = torch.zeros(batch, dtype=torch.bool)
    if not ref["kwargs"].get("num_zero_tokens"):
        for m in masks:
            if m is not None:
                full |= ~m.any(-1)
    return full


def _close(ours: torch.Tensor, expected: torch.Tensor, full: torch.Tensor) -> float:
    assert ours.shape == expected.shape, (tuple(ours.shape), tuple(expected.shape))
    diff = (ours.detach() - expected).abs().flatten(1).amax(1)  # per sample
    assert (diff[~full] <= TOL).all(), f"max difference {diff[~full].max():.3g} > {TOL}"
    if full.any():
        assert (diff[full] <= FULLY_MASKED_TOL).all(), f"fully masked sample: {diff[full].max():.3g}"
    return diff[~full].max().item()


@pytest.mark.parametrize("name", CASES)
def test_state_dict_keys_equal_flash_perceivers(reference, name):
    ref = reference[name]
    assert list(getattr(fp, ref["cls"])(**ref["kwargs"]).state_dict()) == ref["keys"]


@pytest.mark.parametrize("name", CASES)
def test_outputs_match_flash_perceiver(reference, name):
    ref = reference[name]
    with torch.no_grad():
        out = _run(_ours(ref), ref)
    full = _fully_masked(ref)
    if ref["fwd"].get("return_attn_weights"):
        out, weights = out
        assert len(weights) == len(ref["weights"])
        worst = max(_close(w, r, full) for w, r in zip(weights, ref["weights"]))
        print(f"{name}: attention weights max diff {worst:.2e}")
    assert ref["out"].abs().max() > 0.3  # not a degenerate comparison
    print(f"{name}: output max diff {_close(out, ref['out'], full):.2e}")


def test_latent_drop_keeps_the_same_latents_as_flash_perceiver(reference):
    ref = reference["latent_drop_train"]
    model = _ours(ref)
    out = _run(model, ref)
    assert out.shape == (3, 4, 16)  # int((1 - 0.5) * 8) latents kept per sample
    model.eval()
    assert _run(model, ref).shape == (3, 8, 16)


@pytest.mark.parametrize("name", ["gradients", "long_inputs_grad", "io_grad"])
def test_gradients_match_flash_perceiver(reference, name, monkeypatch):
    ref = reference[name]
    model = _ours(ref)
    # the long case's cross-attention takes the native kernel where it is built, else the chunked oneDNN
    # attention where oneDNN is on
    kernel = native_attention if native_attention.available() else onednn_attention
    routed, attend = [], kernel.attend
    monkeypatch.setattr(kernel, "attend", lambda q, *a, **k: routed.append(q.shape) or attend(q, *a, **k))
    data = ref["inputs"]["data"]
    leaves = [d.clone().requires_grad_() for d in (data if isinstance(data, list) else [data])]
    inputs = {**ref["inputs"], "data": leaves if isinstance(data, list) else leaves[0]}
    out = _run(model, ref, inputs)
    torch.testing.assert_close(out.detach(), ref["out"], rtol=0, atol=TOL)
    (out * ref["cotangent"]).sum().backward()
    worst = 0.0
    for key, p in model.state_dict(keep_vars=True).items():
        expected = ref["grads"][key]
        if expected is None:  # unused by the reference (none here): unused by us too
            assert p.grad is None or not p.grad.any(), key
            continue
        err = (p.grad - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        assert err <= GRAD_RTOL, f"{key}: relative gradient difference {err:.3g}"
        worst = max(worst, err)
    for leaf, expected in zip(leaves, ref["input_grads"]):
        err = (leaf.grad - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        assert err <= GRAD_RTOL, f"input gradient: relative difference {err:.3g}"
    if name == "long_inputs_grad" and (kernel is native_attention or onednn_enabled()):
        assert (3, 1, 256, 64) in routed
    print(f"{name}: parameter gradients max relative diff {worst:.2e}")


def test_utilities_match_flash_perceiver(reference):
    ref = reference["utilities"]
    for name in ("patches_nerf", "pixels_gaussian_last", "plain"):
        case = ref[name]
        pos = None
        if case["enc"] is not None:
            kind, in_dim, kwargs = case["enc"]
            pos = (fp.NeRFPositionalEncoding if kind == "nerf" else fp.GaussianFourierFeatureTransform)(in_dim, **kwargs)
        adapter = fp.ImageAdapter(**case["kwargs"], pos_encoding=pos)
        assert list(adapter.state_dict()) == list(case["state"])
        adapter.load_state_dict(case["state"], strict=True)
        torch.testing.assert_close(adapter(case["images"]), case["out"], rtol=0, atol=TOL, msg=name)
    g = ref["gaussian_seeded"]
    enc = fp.GaussianFourierFeatureTransform(3, 5, 1.5, seed=11)
    assert torch.equal(enc.proj_matrix, g["proj"])
    torch.testing.assert_close(enc(g["coords"]), g["out"], rtol=0, atol=1e-6)
    torch.testing.assert_close(fp.NeRFPositionalEncoding(3, 5)(ref["nerf"]["coords"]), ref["nerf"]["out"],
                               rtol=0, atol=1e-6)
    torch.manual_seed(3)
    assert torch.equal(fp.random_mask(torch.zeros(6, 9)), ref["random_mask"])
    assert torch.equal(fp.meshgrid(3, 4, batch_size=2), ref["meshgrid"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule, lrs = fp.CosineWithWarmupLR(opt, training_steps=10, warmup_steps=3), []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == ref["lrs"]
