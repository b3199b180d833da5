"""Parity of perceivers' Perceiver AR with krasserm's perceiver-io ``CausalLanguageModel``: 0.6.0 and 0.11.0.

krasserm's package imports pytorch_lightning, so ``_perceiver_ar_reference.py`` (0.6.0) and
``_perceiver_ar_011_reference.py`` (0.11.0: left padding, KV cache) run it in a subprocess once per
session: tiny seeded models with every parameter randomised (a tensor the converter skipped would
show), their eval logits, a training forward (prefix dropout; random sequence truncation in one case)
after a fixed seed, and seeded or greedy generation. Here the state dicts go through
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
REF_011 = Path(sys.prefix) / "refs" / "perceiver-io-0.11.0" / "perceiver"
SCRIPT_011 = Path(__file__).with_name("_perceiver_ar_011_reference.py")
CASES = ["small", "wide_heads"]  # as _perceiver_ar_reference.CASES
TOL = 1e-5

needs_060 = pytest.mark.skipif(not REF.is_dir(), reason=f"{REF.parent} missing (make setup installs it)")
needs_011 = pytest.mark.skipif(not REF_011.is_dir(), reason=f"{REF_011.parent} missing (make setup installs it)")
GREEDY = 1 - 1.5 / 50  # top-f keeps int(1.5) = 1 of the 50 tokens: argmax


def _run(script: Path, out: Path) -> None:
    proc = subprocess.run([sys.executable, str(script), str(out)], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "DONE" in proc.stdout, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("krasserm_ar")
    _run(SCRIPT, out)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in CASES}


@pytest.fixture(scope="module")
def reference_011(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("krasserm_ar_011")
    _run(SCRIPT_011, out)
    return torch.load(out / "v011.pt", weights_only=False)


def _ours(ref: dict) -> CausalLanguageModel:
    model = CausalLanguageModel(CausalLanguageModelConfig(**ref["fields"]))
    return load_krasserm_perceiver_ar(model, ref["state"]).eval()


@needs_060
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


@needs_060
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


@needs_060
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


@needs_060
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_in_training_mode_matches_krasserm(reference, name, use_cache):
    """krasserm's ``generate`` on a model in training mode runs the training forward each step (prefix dropout, and
    random truncation in "wide_heads"); the cache skipped the prefix dropout (other tokens; greedy logits off by up
    to 4.5). In training mode every step now runs in full, cache or not, and the model stays in training mode."""
    ref = reference[name]
    model = _ours(ref).train()
    for g in ref["generate_train"]:
        torch.manual_seed(g["seed"])
        tokens = model.generate(num=g["num"], prompt=g["prompt"], threshold=g["threshold"],
                                temperature=g["temperature"], use_cache=use_cache)
        assert torch.equal(tokens, g["tokens"]), g
    assert model.training


@needs_060
def test_060_lightning_hyperparameters_must_match_the_model(reference, tmp_path):
    """0.6.0's ``LitCausalLanguageModel`` records the latent count as ``num_latents`` (0.11.0: ``max_latents``): only
    0.11.0's name was read, and a model with another latent count loaded silently (logits off by up to 2)."""
    import dataclasses

    import perceivers

    ref = reference["small"]
    ckpt = {"state_dict": {f"model.{k}": v for k, v in ref["state"].items()}, "hyper_parameters": dict(ref["fields"])}
    torch.save(ckpt, tmp_path / "last.ckpt")
    config = CausalLanguageModelConfig(**ref["fields"])
    model = perceivers.load_checkpoint(CausalLanguageModel(config), tmp_path / "last.ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ids"]), ref["eval"], rtol=0, atol=TOL)
    other = dataclasses.replace(config, num_latents=config.num_latents - 2)
    with pytest.raises(CheckpointError, match=f"trained with num_latents={config.num_latents} \\(the model has"):
        perceivers.load_checkpoint(CausalLanguageModel(other), tmp_path / "last.ckpt")


@needs_060
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


# --- 0.11.0: left padding and the KV cache ----------------------------------------------------------


def _ours_011(ref: dict) -> CausalLanguageModel:
    f = ref["fields"]
    config = CausalLanguageModelConfig(
        vocab_size=f["vocab_size"], max_seq_len=f["max_seq_len"], num_latents=f["max_latents"],
        num_channels=f["num_channels"], num_heads=f["num_heads"], num_self_attention_layers=f["num_self_attention_layers"],
        widening_factor=f["self_attention_widening_factor"], cross_attention_dropout=f["cross_attention_dropout"])
    return load_krasserm_perceiver_ar(CausalLanguageModel(config), ref["state"]).eval()


@needs_011
def test_011_rotary_layers_and_widening_factors_match_krasserm(reference_011):
    """0.11.0's num_self_attention_rotary_layers (-1 = every layer; the state dict does not record it) and
    separate cross- / self-attention widening factors are config fields of ours."""
    for ref in reference_011["options"].values():
        f = ref["fields"]
        config = CausalLanguageModelConfig(
            vocab_size=f["vocab_size"], max_seq_len=f["max_seq_len"], num_latents=f["max_latents"],
            num_channels=f["num_channels"], num_heads=f["num_heads"],
            num_self_attention_layers=f["num_self_attention_layers"],
            num_self_attention_rotary_layers=f["num_self_attention_rotary_layers"],
            widening_factor=f["self_attention_widening_factor"],
            cross_attention_widening_factor=f["cross_attention_widening_factor"])
        model = load_krasserm_perceiver_ar(CausalLanguageModel(config), ref["state"]).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(reference_011["ids"]), ref["eval"], rtol=0, atol=TOL)
    # one rotary layer (the default) where krasserm rotated every layer: the outputs differ
    f = reference_011["options"][0]["fields"]
    one = CausalLanguageModel(CausalLanguageModelConfig(
        vocab_size=f["vocab_size"], max_seq_len=f["max_seq_len"], num_latents=f["max_latents"],
        num_channels=f["num_channels"], num_heads=f["num_heads"], num_self_attention_layers=3, widening_factor=2))
    load_krasserm_perceiver_ar(one, reference_011["options"][0]["state"]).eval()
    with torch.no_grad():
        assert (one(reference_011["ids"]) - reference_011["options"][0]["eval"]).abs().max() > 0.1


@needs_011
def test_011_left_padded_forward_matches_krasserm(reference_011):
    """Eval and training (prefix dropout drawn with the same calls) forwards of a left-padded batch."""
    ref = reference_011
    model = _ours_011(ref)
    with torch.no_grad():
        torch.testing.assert_close(model(ref["ids"], pad_mask=ref["pad_mask"]), ref["eval"], rtol=0, atol=TOL)
        torch.testing.assert_close(model(ref["ids"]), ref["eval_unpadded"], rtol=0, atol=TOL)
        assert (ref["eval"] - ref["eval_unpadded"])[1:].abs().max() > 1e-2  # the padding mattered
        model.train()
        torch.manual_seed(1000)
        torch.testing.assert_close(model(ref["ids"], pad_mask=ref["pad_mask"]), ref["train"], rtol=0, atol=TOL)


@needs_011
@pytest.mark.parametrize("use_cache", [False, True])
def test_011_left_padded_generate_matches_krasserm(reference_011, use_cache):
    """Greedy, prompts of 14 and 10 tokens left-padded to 14, the window sliding past max_seq_len."""
    gen = reference_011["generate"]
    tokens, logits = _ours_011(reference_011).generate(
        gen["tokens"].shape[1], gen["prompt"], threshold=GREEDY, pad_mask=gen["pad_mask"], use_cache=use_cache,
        return_logits=True)
    assert torch.equal(tokens, gen["tokens"])
    torch.testing.assert_close(logits, gen["logits"], rtol=0, atol=TOL)


@needs_011
def test_011_kv_cache_matches_while_every_position_is_a_latent(reference_011):
    ref = reference_011["cache_all_latents"]
    tokens, logits = _ours_011(reference_011).generate(ref["tokens"].shape[1], ref["prompt"], threshold=GREEDY,
                                                       return_logits=True)
    assert torch.equal(tokens, ref["tokens"])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=TOL)


@needs_011
def test_011_hf_cache_is_exact_only_while_the_latents_grow(reference_011):
    """krasserm's own cached HF schedule vs the uncached one (docs/perceiver-ar.md): equal while the
    latents grow to max_latents (8 steps from a 5-token prompt), different from then on."""
    ref = reference_011["hf_schedule"]
    diff = (ref["cached"] - ref["uncached"]).abs().amax(dim=(0, 2))
    assert diff[:8].max() < TOL
    assert diff[8:].min() > 0.1


@needs_011
def test_011_converter_refuses_what_it_cannot_represent(reference_011):
    state = reference_011["state"]
    with pytest.raises(ValueError, match="num_heads"):
        from_krasserm_perceiver_ar(state)
    with pytest.raises(CheckpointError, match="output_bias=True"):
        from_krasserm_perceiver_ar({**state, "output_adapter.bias": torch.zeros(50)}, num_heads=4)
    with pytest.raises(CheckpointError, match="out_norm.weight"):
        from_krasserm_perceiver_ar({**state, "out_norm.weight": torch.zeros(32)}, num_heads=4)


@needs_011
def test_011_wrapped_lightning_and_saved_state_dicts_load(reference_011, tmp_path):
    """krasserm's Lightning checkpoints (``{"state_dict": {"model.…"}}``), DDP / torch.compile prefixes, and a saved
    file through ``perceivers.load_checkpoint`` give the bare state dict's model (all failed: 'missing inv_freq',
    or 'missing 46' tensors from load_checkpoint)."""
    import perceivers

    state = reference_011["state"]
    with torch.no_grad():
        expected = _ours_011(reference_011)(reference_011["ids"])
    layouts = [{f"model.{k}": v for k, v in state.items()}, {f"module._orig_mod.{k}": v for k, v in state.items()},
               {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}]
    for layout in layouts:
        model = load_krasserm_perceiver_ar(_ours_011(reference_011), layout).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(reference_011["ids"]), expected, rtol=0, atol=0)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "last.ckpt")
    torch.save(state, tmp_path / "clm.pt")
    for file in ("last.ckpt", "clm.pt"):
        model = perceivers.load_checkpoint(_ours_011(reference_011), tmp_path / file).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(reference_011["ids"]), expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="not a krasserm Perceiver AR state dict"):
        from_krasserm_perceiver_ar({"latents": torch.zeros(3), "layers.0.0.fn.to_q.weight": torch.zeros(2)}, num_heads=4)


@needs_011
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_011_half_precision_state_dicts_convert(reference_011, dtype):
    """A bfloat16 / float16 state dict (its rotary frequencies rounded to that dtype) converts: its inv_freq was
    compared with the model's at float32 precision and refused ('(2,) differs from ... (2,)')."""
    half = {k: v.to(dtype) for k, v in reference_011["state"].items()}
    model = load_krasserm_perceiver_ar(_ours_011(reference_011), half).eval()
    with torch.no_grad():
        expected = _ours_011(reference_011)(reference_011["ids"])
        assert (model(reference_011["ids"]) - expected).abs().max() < 0.1  # rounding of the weights only
    wrong = {**half, "input_adapter.frq_pos_encoding.inv_freq": half["input_adapter.frq_pos_encoding.inv_freq"] * 1.1}
    with pytest.raises(CheckpointError, match="values of .*inv_freq differ"):
        load_krasserm_perceiver_ar(_ours_011(reference_011), wrong)


@needs_011
def test_011_lightning_hyperparameters_must_match_the_model(reference_011, tmp_path):
    """A krasserm Lightning checkpoint records what its state dict cannot show (the latent count, the heads, the
    rotary layers); a model built otherwise is refused, naming the setting, instead of loading silently."""
    import dataclasses

    import perceivers

    ref = reference_011["options"][0]  # every self-attention layer rotates (-1)
    f = ref["fields"]
    ckpt = {"state_dict": {f"model.{k}": v for k, v in ref["state"].items()}, "hyper_parameters": dict(f), "epoch": 1}
    torch.save(ckpt, tmp_path / "last.ckpt")
    config = CausalLanguageModelConfig(
        vocab_size=f["vocab_size"], max_seq_len=f["max_seq_len"], num_latents=f["max_latents"],
        num_channels=f["num_channels"], num_heads=f["num_heads"], num_self_attention_layers=f["num_self_attention_layers"],
        num_self_attention_rotary_layers=f["num_self_attention_rotary_layers"],
        widening_factor=f["self_attention_widening_factor"],
        cross_attention_widening_factor=f["cross_attention_widening_factor"])
    model = perceivers.load_checkpoint(CausalLanguageModel(config), tmp_path / "last.ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(reference_011["ids"]), ref["eval"], rtol=0, atol=TOL)
    other_rotary = 0 if f["num_self_attention_rotary_layers"] else 1
    for change, field in [({"num_latents": f["max_latents"] - 1}, "max_latents"),
                          ({"num_self_attention_rotary_layers": other_rotary}, "num_self_attention_rotary_layers")]:
        with pytest.raises(CheckpointError, match=f"trained with {field}="):
            perceivers.load_checkpoint(CausalLanguageModel(dataclasses.replace(config, **change)), tmp_path / "last.ckpt")
