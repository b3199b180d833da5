"""Parity with perceiver-multi-modality-pytorch 1.4.0 (the fork) for the same weights, all modalities present.

The fork installs as ``perceiver_pytorch`` (clashing with perceiver-pytorch), so ``make setup`` puts it in
``.venv/refs/`` and it runs in a subprocess (``_multimodality_fork_reference.py``) that saves weights, inputs and
outputs; here they are loaded with ``weights_only=True``, converted and compared.
"""

from __future__ import annotations

import pytest
import torch
from _multimodality_fork_reference import REF, run_fork
from torch import nn

import perceivers
from perceivers.convert import from_multimodality_fork
from perceivers.convert.state_dict import CheckpointError
from perceivers.models.multimodal import (
    InputModality,
    InputModalityWithEmbedding,
    MultiModalityPerceiver,
    MultiModalityPerceiverNoPooling,
    MultiModalityWithTextPerceiver,
)

pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"fork not installed in {REF} (run `make setup`)")

IMAGE = ["image", 3, 2, 3, 8.0, 2]
AUDIO = ["audio", 1, 1, 2, 6.0, 2]
SMALL = {"num_latents": 5, "latent_dim": 16, "cross_heads": 2, "latent_heads": 2, "cross_dim_head": 8,
         "latent_dim_head": 8}
SHAPES = {"image": [2, 4, 3, 3], "audio": [2, 7, 1]}


def _case(name, cls="MultiModalityPerceiver", modalities=(IMAGE, AUDIO), shapes=SHAPES, mask=False, **kwargs):
    return {"name": name, "cls": cls, "modalities": [list(m) for m in modalities], "shapes": shapes,
            "mask": mask, "kwargs": {**SMALL, **kwargs}, "embeddings": {}}


CASES = [
    _case("untied_1block_geglu", depth=2, num_classes=3),
    _case("tied_2blocks_gelu", depth=3, num_classes=3, weight_tie_layers=True, num_latent_blocks_per_layer=2,
          use_gelu=True),
    _case("untied_2blocks_geglu_mask", depth=3, num_classes=3, num_latent_blocks_per_layer=2, mask=True),
    _case("tied_1block_geglu_base3", depth=3, num_classes=4, weight_tie_layers=True,
          modalities=(IMAGE, ["audio", 1, 1, 3, 20.0, 3])),
    _case("nopool_tied_2blocks", cls="MultiModalityPerceiverNoPooling", depth=3, weight_tie_layers=True,
          num_latent_blocks_per_layer=2),
    _case("nopool_untied_geglu_mask", cls="MultiModalityPerceiverNoPooling", depth=2, use_gelu=False, mask=True),
    _case("text_tied_2blocks", cls="MultiModalityWithTextPerceiver", depth=3, num_classes=4,
          weight_tie_layers=True, num_latent_blocks_per_layer=2,
          modalities=(IMAGE, ["text", 1, 1, 2, 10.0, 2]), shapes={"image": [2, 4, 3, 3], "text": [2, 6, 1]}),
    _case("text_untied_mask", cls="MultiModalityWithTextPerceiver", depth=2, num_classes=4,
          num_latent_blocks_per_layer=1, mask=True,
          modalities=(AUDIO, ["text", 1, 1, 2, 10.0, 2]), shapes={"audio": [2, 7, 1], "text": [2, 6, 1]}),
]
for case in CASES:
    if case["cls"] == "MultiModalityWithTextPerceiver":
        case["embeddings"] = {"text": [11, 12]}
CLASSES = {c.__name__: c for c in (MultiModalityPerceiver, MultiModalityPerceiverNoPooling,
                                   MultiModalityWithTextPerceiver)}


@pytest.fixture(scope="module")
def fork_results(tmp_path_factory) -> dict:
    return run_fork(CASES, tmp_path_factory.mktemp("multimodality_fork"))


def _build(case: dict) -> nn.Module:
    modalities = []
    for name, channels, axis, bands, max_freq, base in case["modalities"]:
        if case["cls"] == "MultiModalityWithTextPerceiver":
            vocab_dim = case["embeddings"].get(name)
            emb = nn.Embedding(*vocab_dim) if vocab_dim else None
            modalities.append(InputModalityWithEmbedding(name, channels, axis, bands, max_freq, base, embedding=emb))
        else:
            modalities.append(InputModality(name, channels, axis, bands, max_freq, base))
    return CLASSES[case["cls"]](modalities=modalities, **case["kwargs"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_fork(case: dict, fork_results: dict) -> None:
    ref = fork_results[case["name"]]
    model = _build(case)
    model.load_state_dict(from_multimodality_fork(ref["state_dict"]), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref["inputs"], mask=ref.get("mask"))
    assert out.shape == ref["output"].shape
    # torch's float32 tolerance: the unpooled latents reach ≈14, where 1e-5 alone is ≈6 ulps and an AVX2 build
    # (Zen 3) summing in another order differed by 1.1e-5 (8.3e-7 relative) on one of 160 values
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=1.3e-6)


def test_tied_copies_fold(fork_results: dict) -> None:
    """A tied fork model converts to the tied layout (one block per unique module), and an explicit untied
    conversion of it still loads into the untied model."""
    case = next(c for c in CASES if c["name"] == "tied_2blocks_gelu")
    sd = from_multimodality_fork(fork_results[case["name"]]["state_dict"])
    assert {k.split(".")[1] for k in sd if k.startswith("cross_blocks.")} == {"0", "1"}
    # depth 3, 2 blocks per layer, tied: block 0 of each layer (3) + one shared block 1 = 4 latent blocks
    assert {k.split(".")[1] for k in sd if k.startswith("latent_blocks.")} == {"0", "1", "2", "3"}
    untied = from_multimodality_fork(fork_results[case["name"]]["state_dict"], weight_tie_layers=False)
    model = _build({**case, "kwargs": {**case["kwargs"], "weight_tie_layers": False}})
    model.load_state_dict(untied, strict=True)


def test_untied_weights_refuse_tied_conversion(fork_results: dict) -> None:
    sd = fork_results["untied_2blocks_geglu_mask"]["state_dict"]
    with pytest.raises(ValueError, match="tied copy"):
        from_multimodality_fork(sd, weight_tie_layers=True)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_fork_state_dicts_convert(fork_results: dict, prefix: str) -> None:
    """The state dict of a DDP-wrapped or torch.compile'd fork model (every key prefixed) converts as the bare one."""
    sd = fork_results["tied_2blocks_gelu"]["state_dict"]
    wrapped = {prefix + k: v for k, v in sd.items()}
    expected = from_multimodality_fork(sd)
    actual = from_multimodality_fork(wrapped)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_fork_state_dict_files_load_with_load_checkpoint(fork_results: dict, tmp_path) -> None:
    """A fork checkpoint saved with torch.save loads through load_checkpoint (it failed with a bare KeyError: the
    file went to perceiver-pytorch's core converter); one of another model is a CheckpointError naming both."""
    for name in ("tied_2blocks_gelu", "untied_2blocks_geglu_mask"):
        case = next(c for c in CASES if c["name"] == name)
        ref = fork_results[name]
        path = tmp_path / f"{name}.pt"
        torch.save(ref["state_dict"], path)
        model = perceivers.load_checkpoint(_build(case), path).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ref["inputs"], mask=ref.get("mask")), ref["output"], atol=1e-5, rtol=1.3e-6)
    from perceivers.experimental import GatedPerceiver

    other = GatedPerceiver(num_freq_bands=2, depth=2, max_freq=4.0, num_latents=4, latent_dim=8, num_classes=2)
    with pytest.raises(CheckpointError, match=r"untied_2blocks_geglu_mask\.pt.*GatedPerceiver.*layers\.0\."):
        perceivers.load_checkpoint(other, tmp_path / "untied_2blocks_geglu_mask.pt")
