"""Parity of perceivers' Perceiver AR with krasserm's perceiver-io 0.6.0 ``CausalLanguageModel``.

krasserm's package imports pytorch_lightning, so ``_perceiver_ar_reference.py`` runs it in a subprocess
once per session: tiny seeded models with every parameter randomised (a tensor the converter skipped
would show), their eval logits, a training forward (prefix dropout; random sequence truncation in one
case) after a fixed seed, and seeded ``generate`` calls. Here the state dicts go through
:mod:`perceivers.convert.krasserm` into our model, which must give the same numbers and tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceivers.convert.krasserm import from_krasserm_perceiver_ar, load_krasserm_perceiver_ar
from perceivers.convert.state_dict import CheckpointError
from perceivers.models.perceiver_ar import CausalLanguageModel, CausalLanguageModelConfig

REF = Path(sys.prefix) / "refs" / "perceiver-io-0.6.0" / "perceiver"
SCRIPT = Path(__file__).with_name("_perceiver_ar_reference.py")
CASES = ["small", "wide_heads"]  # as _perceiver_ar_reference.CASES
TOL = 1e-5

pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"{REF.parent} missing (make setup installs it)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("krasserm_ar")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "DONE" in proc.stdout, proc.stderr[-3000:]
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in CASES}


def _ours(ref: dict) -> CausalLanguageModel:
    model = CausalLanguageModel(CausalLanguageModelConfig(**ref["fields"]))
    return load_krasserm_perceiver_ar(model, ref["state"]).eval()


@pytest.mark.parametrize("name", CASES)
def test_eval_logits_match_krasserm(reference, name):
    ref = reference[name]
    with torch.no_grad():
        logits = _ours(ref)(ref["ids"])
    expected = ref["eval"]
    assert logits.shape == expected.shape == (ref["ids"].shape[0], ref["fields"]["num_latents"],
                                              ref["fields"]["vocab_size"])
    assert expected.abs().max() > 1.0  # not a degenerate comparison
    torch.testing.assert_close(logits, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", CASES)
def test_training_forward_with_prefix_dropout_matches_krasserm(reference, name):
    """Same seed, same draws in the same order: the same prefix positions dropped (and truncation)."""
    ref = reference[name]
    model = _ours(ref).train()
    torch.manual_seed(1000 + CASES.index(name))
    with torch.no_grad():
        logits = model(ref["ids"])
    torch.testing.assert_close(logits, ref["train"], rtol=0, atol=TOL)
    assert (logits - ref["eval"]).abs().max() > 1e-3  # dropout did change the result


@pytest.mark.parametrize("name", CASES)
def test_generate_matches_krasserm(reference, name):
    """Seeded top-f sampling: short prompts (all latents) and windows sliding past max_seq_len."""
    ref = reference[name]
    model = _ours(ref)
    for g in ref["generate"]:
        torch.manual_seed(g["seed"])
        tokens = model.generate(num=g["num"], prompt=g["prompt"], threshold=g["threshold"],
                                temperature=g["temperature"])
        assert torch.equal(tokens, g["tokens"]), g


def test_converter_refuses_what_does_not_fit(reference):
    ref = reference["small"]
    state = dict(ref["state"])
    model = CausalLanguageModel(CausalLanguageModelConfig(**ref["fields"]))
    with pytest.raises(CheckpointError, match="self_attention.0.0.module.extra"):
        from_krasserm_perceiver_ar({**state, "self_attention.0.0.module.extra": torch.zeros(1)})
    missing = {k: v for k, v in state.items() if k != "cross_attention.0.module.attention.o_proj.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1: cross_attention\.attn\.to_out\.bias"):
        load_krasserm_perceiver_ar(model, missing)
    wider = CausalLanguageModel(CausalLanguageModelConfig(**{**ref["fields"], "max_seq_len": 30}))
    with pytest.raises(CheckpointError, match=r"input_adapter\.pos_embedding"):
        load_krasserm_perceiver_ar(wider, state)
    other = CausalLanguageModel(CausalLanguageModelConfig(**{**ref["fields"], "num_heads": 2}))
    with pytest.raises(CheckpointError, match="inv_freq"):
        load_krasserm_perceiver_ar(other, state)
