"""Parity with the fork's ``HierarchicalMultiModalityPerceiver`` (+ ``NoPooling``) for the same weights.

As ``test_multimodality_fork.py``: the fork runs in a subprocess (``_multimodality_fork_reference.py``) that saves
weights, inputs and outputs; here they are converted with ``from_multimodality_fork`` and compared.
"""

from __future__ import annotations

import pytest
import torch
from _multimodality_fork_reference import REF, run_fork

from perceivers import (
    HierarchicalConfigurator,
    HierarchicalMultiModalityPerceiver,
    HierarchicalMultiModalityPerceiverNoPooling,
    InputModality,
    from_pretrained,
    save_pretrained,
)
from perceivers.convert import from_multimodality_fork

needs_fork = pytest.mark.skipif(not REF.is_dir(), reason=f"fork not installed in {REF} (run `make setup`)")

IMAGE = ["image", 3, 2, 3, 8.0, 2]
AUDIO = ["audio", 1, 1, 2, 6.0, 2]
HEADS = {"cross_heads": 2, "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8}
SHAPES = {"image": [2, 4, 3, 3], "audio": [2, 7, 1]}
ERRORS: dict[str, float] = {}


def _case(name, configurator, cls="HierarchicalMultiModalityPerceiver", mask=False, **kwargs):
    return {"name": name, "cls": cls, "modalities": [IMAGE, AUDIO], "shapes": SHAPES, "mask": mask,
            "kwargs": {**HEADS, **kwargs}, "embeddings": {}, "configurator": configurator}


CASES = [
    _case("geglu_depth3_2blocks", [3, 8, 6], depth=3, num_classes=3, num_latent_blocks_per_layer=2),
    _case("gelu_mask", [2, 6, 8], depth=2, num_classes=4, use_gelu=True, mask=True),
    _case("odd_latents_shallower_than_configurator", [4, 7, 4], depth=3, num_classes=2),
    _case("nopool_mask", [3, 8, 4], cls="HierarchicalMultiModalityPerceiverNoPooling", depth=3, mask=True),
    _case("nopool_geglu_2blocks", [2, 5, 6], cls="HierarchicalMultiModalityPerceiverNoPooling", depth=2,
          use_gelu=False, num_latent_blocks_per_layer=2, num_latents=5, latent_dim=6),
]
CLASSES = {c.__name__: c for c in (HierarchicalMultiModalityPerceiver, HierarchicalMultiModalityPerceiverNoPooling)}


@pytest.fixture(scope="module")
def fork_results(tmp_path_factory) -> dict:
    return run_fork(CASES, tmp_path_factory.mktemp("multimodality_fork_hierarchical"))


def _build(case: dict):
    modalities = [InputModality(*m) for m in case["modalities"]]
    return CLASSES[case["cls"]](modalities=modalities, configurator=HierarchicalConfigurator(*case["configurator"]),
                                **case["kwargs"])


@needs_fork
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_fork(case: dict, fork_results: dict) -> None:
    ref = fork_results[case["name"]]
    model = _build(case)
    model.load_state_dict(from_multimodality_fork(ref["state_dict"]), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(ref["inputs"], mask=ref.get("mask"))
    assert out.shape == ref["output"].shape
    ERRORS[case["name"]] = float((out - ref["output"]).abs().max())
    torch.testing.assert_close(out, ref["output"], atol=1e-5, rtol=0)


@needs_fork
def test_hierarchical_state_dict_refuses_tying(fork_results: dict) -> None:
    with pytest.raises(ValueError, match="never tied"):
        from_multimodality_fork(fork_results["gelu_mask"]["state_dict"], weight_tie_layers=True)


def test_sizes_per_layer_and_output() -> None:
    cfg = HierarchicalConfigurator(3, 9, 4)
    assert [(cfg.get_num_latents(i), cfg.get_latent_dim(i)) for i in range(3)] == [(9, 4), (4, 8), (2, 16)]
    model = _build(_case("x", [3, 9, 4], cls="HierarchicalMultiModalityPerceiverNoPooling", depth=3))
    assert [tuple(p.shape) for p in model.latents] == [(9, 4), (4, 8), (2, 16)]
    data = {"image": torch.randn(2, 4, 3, 3), "audio": torch.randn(2, 7, 1)}
    assert model(data).shape == (2, 2, 16)
    pooled = _build(_case("y", [3, 9, 4], depth=2, num_classes=None))
    assert pooled(data).shape == (2, 8)  # num_classes=None: mean of the last latents (the fork crashes)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="halves to 0 latents at layer 3"):
        _build(_case("x", [4, 7, 4], depth=4))  # depth 3 is fine (a parity case), as in the fork
    with pytest.raises(ValueError, match="depth must be in"):
        _build(_case("x", [2, 8, 4], depth=3))
    with pytest.raises(ValueError, match="cannot tie"):
        _build(_case("x", [2, 8, 4], depth=2, weight_tie_layers=True))
    with pytest.raises(ValueError, match="num_latents=16 disagrees"):
        _build(_case("x", [2, 8, 4], cls="HierarchicalMultiModalityPerceiverNoPooling", depth=2, num_latents=16))


def test_save_and_load(tmp_path) -> None:
    model = _build(_case("x", [3, 8, 4], depth=3, num_classes=3, mask=True)).eval()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, HierarchicalMultiModalityPerceiver) and loaded.configurator == model.configurator
    data = {"image": torch.randn(2, 4, 3, 3), "audio": torch.randn(2, 7, 1)}
    with torch.no_grad():
        assert torch.equal(loaded(data), model(data))


def test_report_max_errors() -> None:
    """Prints the measured parity errors (run with -s)."""
    for name, err in sorted(ERRORS.items()):
        print(f"hierarchical fork parity {name}: max |ours - fork| = {err:.2e}")
