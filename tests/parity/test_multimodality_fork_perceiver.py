"""Parity with the multi-modality fork's top-level ``perceiver_pytorch.Perceiver`` and ``perceiver_pytorch.gated``.

Both are perceiver-pytorch's early models with log-spaced Fourier bands (``freq_base``); here they are
:mod:`perceivers.multimodality_fork`'s ``Perceiver`` / ``GatedPerceiver``, loaded with the fork's weights through
``from_lucidrains`` / ``from_lucidrains_variant`` (and ``load_checkpoint`` for a saved state dict). The fork runs in
a subprocess (``_multimodality_fork_reference.py``), as in ``test_multimodality_fork.py``.
"""

from __future__ import annotations

import pytest
import torch
from _multimodality_fork_reference import REF, run_fork

import perceivers
from perceivers.convert import from_lucidrains, from_lucidrains_variant
from perceivers.layers import band_frequencies
from perceivers.multimodality_fork import GatedPerceiver, Perceiver

pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"fork not installed in {REF} (run `make setup`)")

SMALL = {"num_latents": 6, "latent_dim": 16, "cross_heads": 2, "latent_heads": 2, "cross_dim_head": 8,
         "latent_dim_head": 8, "num_classes": 5}
CASES = [
    {"name": "image_untied", "cls": "Perceiver", "shape": [2, 7, 9, 3], "mask": False,
     "kwargs": {**SMALL, "num_freq_bands": 4, "depth": 2, "max_freq": 10.0}},
    {"name": "image_tied_mask", "cls": "Perceiver", "shape": [2, 7, 9, 3], "mask": True,
     "kwargs": {**SMALL, "num_freq_bands": 4, "depth": 3, "max_freq": 10.0, "weight_tie_layers": True}},
    {"name": "sequence_base3", "cls": "Perceiver", "shape": [2, 20, 2], "mask": False,
     "kwargs": {**SMALL, "num_freq_bands": 5, "depth": 2, "max_freq": 30.0, "freq_base": 3, "input_channels": 2,
                "input_axis": 1}},
    {"name": "gated_tied", "cls": "GatedPerceiver", "shape": [2, 5, 6, 3], "mask": True,
     "kwargs": {**SMALL, "num_freq_bands": 3, "depth": 3, "max_freq": 8.0, "weight_tie_layers": True}},
]


@pytest.fixture(scope="module")
def fork_results(tmp_path_factory) -> dict:
    return run_fork(CASES, tmp_path_factory.mktemp("multimodality_fork_perceiver"))


def _ours(case: dict, ref: dict) -> torch.nn.Module:
    if case["cls"] == "Perceiver":
        model = Perceiver(**case["kwargs"])
        model.load_state_dict(from_lucidrains(ref["state_dict"]), strict=True)
    else:
        model = GatedPerceiver(**case["kwargs"])
        model.load_state_dict(from_lucidrains_variant(ref["state_dict"]), strict=True)
    return model.eval()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_fork(case: dict, fork_results: dict) -> None:
    ref = fork_results[case["name"]]
    model = _ours(case, ref)
    with torch.no_grad():
        out = model(ref["inputs"], mask=ref.get("mask"))
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)


def test_streamed_input_matches_fork(fork_results: dict) -> None:
    """The log-spaced bands reach the chunked path (features built per chunk) unchanged."""
    case = CASES[0]
    ref = fork_results[case["name"]]
    model = _ours(case, ref)
    model.chunk_size = 9  # whole image rows per chunk
    with torch.no_grad():
        out = model(ref["inputs"])
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)


def test_fork_state_dict_file_loads(fork_results: dict, tmp_path) -> None:
    """A fork checkpoint saved with torch.save loads through load_checkpoint (names recognised and renamed)."""
    case = CASES[1]
    ref = fork_results[case["name"]]
    path = tmp_path / "fork.pt"
    torch.save(ref["state_dict"], path)
    model = perceivers.load_checkpoint(Perceiver(**case["kwargs"]), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["inputs"], mask=ref["mask"]), ref["output"], atol=1e-5, rtol=0)


def test_fork_gated_state_dict_file_loads(fork_results: dict, tmp_path) -> None:
    """The fork's gated.Perceiver saved with torch.save loads through load_checkpoint too (it failed with a bare
    KeyError: the file went to the core Perceiver's converter), wrapped in a Lightning-style checkpoint as well."""
    case = next(c for c in CASES if c["cls"] == "GatedPerceiver")
    ref = fork_results[case["name"]]
    path = tmp_path / "gated.pt"
    torch.save(ref["state_dict"], path)
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref["state_dict"].items()}}, tmp_path / "gated.ckpt")
    for file in (path, tmp_path / "gated.ckpt"):
        model = perceivers.load_checkpoint(GatedPerceiver(**case["kwargs"]), file).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ref["inputs"], mask=ref["mask"]), ref["output"], atol=1e-5, rtol=0)


def test_fork_defaults_and_bands() -> None:
    model = Perceiver(num_freq_bands=6, depth=1, max_freq=10.0, num_latents=4, latent_dim=8, num_classes=2)
    assert model.freq_base == 2 and model.position_encoding.freq_base == 2.0
    bands = band_frequencies(6, 10.0, 2)
    assert bands[0] == 2.0 and abs(bands[-1].item() - 5.0) < 1e-5  # lowest band 2, highest max_freq / 2
    ratios = bands[1:] / bands[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 2.5 ** 0.2))  # log-spaced: (5 / 2) ** (1 / 5)
    assert perceivers.Perceiver(num_freq_bands=6, depth=1, max_freq=10.0).freq_base is None
    with pytest.raises(ValueError, match="freq_base"):
        Perceiver(num_freq_bands=6, depth=1, max_freq=10.0, freq_base=1)


def test_saves_and_rebuilds(tmp_path) -> None:
    model = GatedPerceiver(num_freq_bands=3, depth=2, max_freq=8.0, num_latents=4, latent_dim=8, cross_dim_head=4,
                           latent_dim_head=4, latent_heads=2, num_classes=3, cross_dim=512).eval()
    perceivers.save_pretrained(model, tmp_path / "gated")
    again = perceivers.from_pretrained(tmp_path / "gated").eval()
    assert type(again) is GatedPerceiver and again.input.position_encoding.freq_base == 2.0
    x = torch.randn(1, 4, 5, 3)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_to_logits_is_the_forks_norm_and_linear(case: dict, fork_results: dict) -> None:
    """The fork's Perceiver and gated Perceiver pool before ``to_logits = Sequential(LayerNorm, Linear)`` (its
    keys ``to_logits.0.*`` are the norm's, ``to_logits.1.*`` the Linear's). Our Perceiver had the later
    perceiver-pytorch layout (pool → norm → linear): ``to_logits[1] = nn.Linear(D, n)`` replaced the norm and
    failed in forward, and ``to_logits = nn.Identity()`` gave latents [B, N, D] instead of the pooled [B, D]."""
    ref = fork_results[case["name"]]
    assert ref["state_dict"]["to_logits.0.weight"].ndim == 1 and ref["state_dict"]["to_logits.1.weight"].ndim == 2
    model = _ours(case, ref)
    assert isinstance(model.to_logits[0], torch.nn.LayerNorm) and isinstance(model.to_logits[1], torch.nn.Linear)
    assert len(model.to_logits) == 2
    x, mask = ref["inputs"], ref.get("mask")
    with torch.no_grad():
        pooled = model(x, mask=mask, return_embeddings=True).mean(dim=-2)
        torch.testing.assert_close(model.to_logits[1](model.to_logits[0](pooled)), ref["output"], atol=1e-5, rtol=0)
        new = torch.nn.Linear(pooled.shape[-1], 9)
        model.to_logits[1] = new
        torch.testing.assert_close(model(x, mask=mask), new(model.to_logits[0](pooled)), atol=1e-6, rtol=0)
        model.to_logits = torch.nn.Identity()
        torch.testing.assert_close(model(x, mask=mask), pooled, atol=1e-6, rtol=0)
