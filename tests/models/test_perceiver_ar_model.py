"""Unit tests of Perceiver AR (parity with krasserm's lives in tests/parity/test_perceiver_ar.py)."""

from __future__ import annotations

import json

import pytest
import torch

from perceivers.configurable import init_config
from perceivers.layers.rotary import RotaryEmbedding, rotate
from perceivers.models.perceiver_ar import CausalLanguageModel, CausalLanguageModelConfig

FIELDS = {"vocab_size": 30, "max_seq_len": 20, "num_latents": 6, "num_channels": 16, "num_heads": 2,
          "num_self_attention_layers": 2}


def _model(**overrides) -> CausalLanguageModel:
    torch.manual_seed(0)
    return CausalLanguageModel(CausalLanguageModelConfig(**{**FIELDS, **overrides}))


def _ids(b: int = 2, n: int = 16) -> torch.Tensor:
    return torch.randint(0, FIELDS["vocab_size"], (b, n), generator=torch.Generator().manual_seed(1))


def test_shapes_and_causality():
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        logits = model(ids)
        changed = ids.clone()
        changed[:, -2] = (changed[:, -2] + 1) % FIELDS["vocab_size"]
        other = model(changed)
    assert logits.shape == (2, 6, 30)
    # the latent at position -2 and later see the change, earlier latents do not
    torch.testing.assert_close(other[:, :-2], logits[:, :-2], rtol=0, atol=0)
    assert (other[:, -2:] - logits[:, -2:]).abs().max() > 1e-4


def test_prefix_change_reaches_every_latent():
    model = _model().eval()
    ids = _ids()
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % FIELDS["vocab_size"]
    with torch.no_grad():
        diff = (model(changed) - model(ids)).abs().amax(dim=(0, 2))
    assert (diff > 1e-6).all()


@pytest.mark.parametrize(("bad", "error", "match"), [
    (torch.zeros(2, 10), TypeError, "int64"),
    ([[1, 2, 3]], TypeError, "list"),
    (torch.zeros(2, 21, dtype=torch.long), ValueError, "exceeds max_seq_len=20"),
    (torch.zeros(2, 5, dtype=torch.long), ValueError, "shorter than num_latents=6"),
    (torch.zeros(10, dtype=torch.long), ValueError, r"\[batch, seq_len\]"),
    (torch.full((1, 8), 30), ValueError, r"token ids must lie in \[0, 30\)"),
])
def test_bad_input_is_refused(bad, error, match):
    with pytest.raises(error, match=match):
        _model()(bad)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        _model(num_channels=18, num_heads=4)
    with pytest.raises(ValueError, match="must be even"):
        _model(num_channels=12, num_heads=2)  # rotary width 3
    with pytest.raises(ValueError, match="cross_attention_dropout"):
        _model(cross_attention_dropout=1.0)
    with pytest.raises(ValueError, match="max_seq_len >= 16"):
        _model(max_seq_len=12, random_sequence_truncation=True)
    with pytest.raises(ValueError, match="num_self_attention_rotary_layers must be >= 0 or -1"):
        _model(num_self_attention_rotary_layers=-2)
    # accepted before, then unusable (forward refused every length; ids in [0, 0)) or a ZeroDivisionError
    with pytest.raises(ValueError, match="num_latents=21 must be <= max_seq_len=20"):
        _model(num_latents=21)
    for field in ("num_heads", "vocab_size", "max_seq_len"):
        with pytest.raises(ValueError, match=f"{field} must be an int >= 1, got 0"):
            _model(**{field: 0})


@pytest.mark.parametrize("num", [2.5, True, -1])
def test_generate_refuses_a_count_that_is_not_a_natural_number(num):
    with pytest.raises(ValueError, match=f"num must be an int >= 0, got {num}"):
        _model().generate(num, _ids(1, 8))


def test_generate_logits_have_the_dtype_of_a_step_under_autocast():
    """No step (``num=0``) gave float32 logits under bfloat16 autocast, one step bfloat16."""
    model = _model().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = {model.generate(n, _ids(2, 8), return_logits=True)[1].dtype for n in (0, 1)}
    assert dtypes == {torch.bfloat16}


def test_prefix_dropout_keeps_the_documented_count():
    model = _model(cross_attention_dropout=0.3).train()
    prefix = torch.randn(3, 10, 16)
    kept_prefix, positions = model._drop_prefix(prefix)
    assert positions.shape == (3, 10 - int(10 * 0.3))
    assert (positions.diff(dim=1) > 0).all()  # order kept
    torch.testing.assert_close(kept_prefix, prefix[torch.arange(3)[:, None], positions])


def test_no_dropout_training_equals_eval():
    model = _model(cross_attention_dropout=0.0)
    ids = _ids()
    with torch.no_grad():
        train = model.train()(ids)
        evaluated = model.eval()(ids)
    torch.testing.assert_close(train, evaluated, rtol=0, atol=0)


def test_backward_and_activation_checkpointing_give_the_same_gradients():
    ids = _ids()
    grads = []
    for ckpt in (False, True):
        model = _model(activation_checkpointing=ckpt, cross_attention_dropout=0.0).train()
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert all(g is not None and torch.isfinite(g).all() for g in grads[-1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_generate_shapes_and_determinism():
    model = _model().eval()
    prompt = _ids(2, 4)  # shorter than num_latents, then sliding past max_seq_len
    torch.manual_seed(3)
    a = model.generate(num=20, prompt=prompt, threshold=0.8, temperature=0.7)
    torch.manual_seed(3)
    b = model.generate(num=20, prompt=prompt, threshold=0.8, temperature=0.7)
    assert a.shape == (2, 20) and torch.equal(a, b)
    with pytest.raises(ValueError, match="keeps no token"):
        model.generate(num=1, prompt=prompt, threshold=0.99)


def test_config_round_trips_through_json():
    model = _model()
    config = json.loads(json.dumps(init_config(model)))
    assert config["class"] == "perceivers.models.perceiver_ar.CausalLanguageModel"
    assert config["kwargs"]["config"]["fields"] == {**CausalLanguageModelConfig(**FIELDS).__dict__}


def test_rotary_preserves_norms_and_relative_positions():
    rotary = RotaryEmbedding(8)
    q, k = torch.randn(1, 2, 1, 12), torch.randn(1, 2, 1, 12)
    angles = rotary(torch.arange(40))
    # scores depend on the distance only
    s1 = (rotate(q, angles[[5]]) * rotate(k, angles[[2]])).sum()
    s2 = (rotate(q, angles[[35]]) * rotate(k, angles[[32]])).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(q, angles[[17]]).norm(), q.norm())
    torch.testing.assert_close(rotate(q, angles[[0]]), q)  # position 0: identity
    torch.testing.assert_close(rotate(q, angles[[9]])[..., 8:], q[..., 8:], rtol=0, atol=0)  # unrotated channels
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5)


# --- left padding (pad_mask, True = padding) and the generate cache ---------------------------------

GREEDY = 0.95  # int((1 - 0.95) * 30) = 1 token kept: top-f sampling becomes argmax


def _lively(**overrides) -> CausalLanguageModel:
    """A model with large random weights, so that logits differ clearly between positions."""
    model = _model(**overrides).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat((torch.full((width - len(p),), 7), p)) for p in prompts])
    pad = torch.stack([torch.arange(width) < width - len(p) for p in prompts])
    return ids, pad


def test_padded_rows_give_their_unpadded_logits():
    model = _lively()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 30, (n,), generator=g) for n in (6, 11, 17)]
    ids, pad = _left_pad(prompts)
    with torch.no_grad():
        batched = model(ids, pad_mask=pad)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(batched[i], model(p[None])[0], rtol=0, atol=1e-5)
        assert (batched - model(ids)).abs().max() > 1e-3  # without the mask, padding does change them


@pytest.mark.parametrize("use_cache", [False, True])
def test_generate_left_padded_batch_matches_each_prompt_alone(use_cache):
    """Prompts shorter than num_latents, between num_latents and max_seq_len, and sliding past it."""
    model = _lively()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 30, (n,), generator=g) for n in (2, 5, 9, 14)]
    ids, pad = _left_pad(prompts)
    tokens, logits = model.generate(12, ids, threshold=GREEDY, pad_mask=pad, use_cache=use_cache, return_logits=True)
    for i, p in enumerate(prompts):
        alone, alone_logits = model.generate(12, p[None], threshold=GREEDY, use_cache=use_cache, return_logits=True)
        assert torch.equal(tokens[i], alone[0]), i
        torch.testing.assert_close(logits[i], alone_logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("prompt_len", [3, 10, 20])
def test_cached_generate_equals_uncached(prompt_len):
    """All-latent phase, prefix phase and the sliding window; seeded sampling draws the same tokens."""
    model = _lively()
    prompt = _ids(2, prompt_len)
    out = {}
    for use_cache in (False, True):
        torch.manual_seed(11)
        out[use_cache] = model.generate(18, prompt, threshold=0.5, temperature=0.8, use_cache=use_cache,
                                        return_logits=True)
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-4)
    assert out[False][1].abs().max() > 5.0


def test_cached_generate_with_padding_equals_uncached():
    model = _lively()
    ids, pad = _left_pad([_ids(1, n)[0] for n in (3, 8)])
    torch.manual_seed(4)
    cached = model.generate(15, ids, threshold=0.6, pad_mask=pad, return_logits=True)
    torch.manual_seed(4)
    plain = model.generate(15, ids, threshold=0.6, pad_mask=pad, use_cache=False, return_logits=True)
    assert torch.equal(cached[0], plain[0])
    torch.testing.assert_close(cached[1], plain[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize(("bad", "error", "match"), [
    (torch.zeros(2, 10, dtype=torch.long), TypeError, "bool tensor"),
    (torch.zeros(2, 9, dtype=torch.bool), ValueError, r"shape \(2, 10\)"),
    (torch.tensor([[False] * 9 + [True]] * 2), ValueError, "left only"),
    (torch.tensor([[True] * 10, [False] * 10]), ValueError, "every position of rows \\[0\\]"),
])
def test_bad_pad_mask_is_refused(bad, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        model(_ids(2, 10), pad_mask=bad)
    with pytest.raises(error, match=match):
        model.generate(1, _ids(2, 10), pad_mask=bad)


def test_training_with_padding_in_prefix_and_latents_is_finite():
    model = _model(cross_attention_dropout=0.5, random_sequence_truncation=False).train()
    ids, pad = _left_pad([_ids(1, n)[0] for n in (3, 12, 16)])
    logits = model(ids, pad_mask=pad)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_causal_keep_mask():
    from perceivers.models.perceiver_ar import causal_keep_mask
    pad = torch.tensor([[True, True, False, False, False]])
    keep = causal_keep_mask(3, pad)[0, 0]  # queries are positions 2, 3, 4
    expected = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep, expected)
    assert torch.equal(causal_keep_mask(2, pad)[0, 0, 0], torch.tensor([0, 0, 1, 1, 0], dtype=torch.bool))
    assert torch.equal(causal_keep_mask(5, pad)[0, 0, 1], torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool))  # itself


def test_left_padded_forward_compiles_without_graph_breaks():
    """The pad-mask checks that read values (left padding only, a real token per row) are skipped while
    compiling or exporting, as the other value checks are; they broke the graph (fullgraph=True failed)."""
    model = _lively()
    ids, pad = _left_pad([_ids(1, n)[0] for n in (4, 12, 16)])
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(ids, pad)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(ids, pad), model(ids, pad), rtol=0, atol=1e-6)


def test_exports_with_a_dynamic_length_down_to_the_latents_alone():
    """A length ``L`` traced by torch.export covers ``L = num_latents`` (no prefix) and ``num_latents + 1``: ``min()``
    of the length, the prefix's own tensors and the latents' slices of the sequence had made the program fix
    ``L ≥ num_latents + 2``. Left-padded rows too (the mask's length follows the ids')."""
    model = _lively()
    length = torch.export.Dim("length", min=6, max=20)
    batch = torch.export.Dim("batch", min=1, max=16)
    ids, pad = _left_pad([_ids(1, n)[0] for n in (9, 14)])
    program = torch.export.export(model, (ids, pad), dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}))
    for n in (6, 7, 8, 20):
        ids, pad = _left_pad([_ids(1, k)[0] for k in (6, n - 1, n)])
        with torch.no_grad():
            torch.testing.assert_close(program.module()(ids, pad), model(ids, pad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 0.0, -1.0])
def test_generate_refuses_a_temperature_that_is_not_a_finite_positive_number(temperature):
    """NaN passed the `temperature <= 0` check and inf divides -inf by inf (NaN): both failed in
    torch.multinomial ('probability tensor contains either inf, nan or element < 0')."""
    with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0, got {temperature}"):
        _model().generate(2, _ids(1, 8), temperature=temperature)


def test_training_forward_with_prefix_dropout_compiles_without_graph_breaks():
    """The kept prefix positions came from ``nonzero`` (an output shape that depends on the data: 5 graph breaks in
    a training forward, ``fullgraph=True`` failed); they are the sorted top-k indices, the same positions."""
    model = _lively(cross_attention_dropout=0.5, random_sequence_truncation=False).train()
    ids = _ids(2, 16)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.manual_seed(3)
    expected = model(ids)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(ids), expected, rtol=0, atol=1e-6)


def test_gradients_of_gradients_in_float64():
    """``create_graph=True`` through the causal attention (SDPA's fused kernel has no derivative of its backward):
    gradgradcheck of the logits as a function of the first cross-attention's LayerNorm weight."""
    model = _model(cross_attention_dropout=0.0).double().train()
    name = next(n for n, p in model.named_parameters() if "norm" in n and p.ndim == 1)
    ids = _ids(1, 8)
    weight = model.get_parameter(name).detach().clone().requires_grad_()
    logits = lambda w: torch.func.functional_call(model, {name: w}, (ids,))
    assert torch.autograd.gradgradcheck(logits, (weight,))
