"""Invariants of the perceiver-pytorch family, checked with hypothesis.

* masked-out inputs influence neither the outputs nor any gradient;
* without position features a Perceiver is invariant to the order of its inputs (and PerceiverIO's
  outputs follow the order of its queries);
* each sample's output is independent of the rest of the batch;
* a fully masked sample gets zeros from every cross-attention (documented; perceiver-pytorch
  attends uniformly instead) and finite outputs and gradients.

The "ci" hypothesis profile (tests/conftest.py) keeps runs short and derandomised.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from perceivers import Perceiver, PerceiverBlock, PerceiverIO, PerceiverLM

P_KW = {
    "num_freq_bands": 3,
    "depth": 2,
    "max_freq": 8.0,
    "input_channels": 3,
    "input_axis": 2,
    "num_latents": 5,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
    "num_classes": 4,
}
IO_KW = {
    "depth": 2,
    "dim": 6,
    "queries_dim": 8,
    "logits_dim": 3,
    "num_latents": 5,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}
LM_KW = {
    "num_tokens": 13,
    "dim": 8,
    "max_seq_len": 9,
    "depth": 1,
    "num_latents": 4,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}


def _eval(model: torch.nn.Module) -> torch.nn.Module:
    # Shift every parameter a little so that no bias or norm is at its neutral initial value.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    return {
        "perceiver": _eval(Perceiver(**P_KW, inverted_cross_attn=(False, True), weight_tie_layers=True)),
        "perceiver_heads": _eval(
            Perceiver(**{**P_KW, "input_axis": 1}, cross_heads=2, self_per_cross_attn=2)
        ),
        "perceiver_nopos": _eval(Perceiver(**{**P_KW, "input_axis": 1}, fourier_encode_data=False)),
        "perceiver_nopos_2d": _eval(
            Perceiver(**P_KW, fourier_encode_data=False, attn_residual=True, attn_residual_rank=4)
        ),
        "io": _eval(PerceiverIO(**IO_KW, decoder_ff=True)),
        "io_inverted": _eval(PerceiverIO(**IO_KW, inverted_cross_attn=True, weight_tie_layers=True)),
        "lm": _eval(PerceiverLM(**LM_KW)),
        "block": _eval(
            PerceiverBlock(
                dim=16, latent_heads=2, cross_dim_head=8, latent_dim_head=8, queries_contribute_kv=True
            )
        ),
    }


@st.composite
def masked_batch(draw, max_batch=3, max_axis=5, axes=2, all_masked_ok=True):
    """(batch, axes shape, mask [B, *axes] bool, seed) — masks may be empty for a sample when allowed."""
    batch = draw(st.integers(1, max_batch))
    shape = tuple(draw(st.integers(1, max_axis)) for _ in range(axes))
    n = int(torch.tensor(shape).prod())
    rows = []
    for _ in range(batch):
        row = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        if not all_masked_ok and not any(row):
            row[draw(st.integers(0, n - 1))] = True
        rows.append(row)
    mask = torch.tensor(rows, dtype=torch.bool).view(batch, *shape)
    return batch, shape, mask, draw(st.integers(0, 2**16))


def _scramble_masked(data: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Replace every masked-out element of ``data [B, *axes, C]`` with large unrelated values."""
    gen = torch.Generator().manual_seed(seed + 1)
    other = 100 * torch.randn(data.shape, generator=gen)
    return torch.where(mask[..., None], data, other)


def _run_with_grads(model, run, data: torch.Tensor):
    model.zero_grad(set_to_none=True)
    data = data.clone().requires_grad_()
    out = run(model, data)
    gen = torch.Generator().manual_seed(0)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), data.grad, grads


def _assert_mask_has_no_influence(model, run, data, mask, seed, keep=None):
    """Outputs (at ``keep`` positions), parameter gradients and unmasked input gradients are unchanged."""
    out_a, dgrad_a, grads_a = _run_with_grads(model, run, data)
    out_b, dgrad_b, grads_b = _run_with_grads(model, run, _scramble_masked(data, mask, seed))
    if keep is not None:
        out_a, out_b = out_a[keep], out_b[keep]
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], atol=1e-5, rtol=1e-5, msg=f"gradient of {key}")
    # Masked inputs get exactly zero gradient; the others the same as before.
    for g in (dgrad_a, dgrad_b):
        assert torch.all(g[~mask] == 0)
    torch.testing.assert_close(dgrad_b[mask], dgrad_a[mask], atol=1e-5, rtol=1e-5)


@given(masked_batch(axes=2))
def test_masked_inputs_have_no_influence_perceiver(models, example):
    batch, shape, mask, seed = example
    data = torch.randn(batch, *shape, 3, generator=torch.Generator().manual_seed(seed))
    _assert_mask_has_no_influence(models["perceiver"], lambda m, d: m(d, mask=mask), data, mask, seed)


@given(masked_batch(axes=1, max_axis=8))
def test_masked_inputs_have_no_influence_perceiver_heads(models, example):
    batch, shape, mask, seed = example
    data = torch.randn(batch, *shape, 3, generator=torch.Generator().manual_seed(seed))
    _assert_mask_has_no_influence(
        models["perceiver_heads"], lambda m, d: m(d, mask=mask, return_embeddings=True), data, mask, seed
    )


@pytest.mark.parametrize("name", ["io", "io_inverted"])
@given(example=masked_batch(axes=1, max_axis=8))
def test_masked_inputs_have_no_influence_perceiver_io(models, name, example):
    batch, shape, mask, seed = example
    data = torch.randn(batch, *shape, 6, generator=torch.Generator().manual_seed(seed))
    queries = torch.randn(3, 8, generator=torch.Generator().manual_seed(seed + 2))
    _assert_mask_has_no_influence(
        models[name], lambda m, d: m(d, mask=mask, queries=queries), data, mask, seed
    )


@given(masked_batch(axes=1, max_axis=9, all_masked_ok=False))
def test_masked_tokens_have_no_influence_on_other_positions_lm(models, example):
    """PerceiverLM decodes at its own inputs, so a masked token only changes its own output row."""
    batch, (n,), mask, seed = example
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (batch, n), generator=gen)
    other = torch.randint(0, 13, (batch, n), generator=gen)
    lm = models["lm"]
    with torch.no_grad():
        a = lm(ids, mask=mask)
        b = lm(torch.where(mask, ids, other), mask=mask)
    torch.testing.assert_close(b[mask], a[mask], atol=1e-6, rtol=0)


@given(masked_batch(axes=1, max_axis=8))
def test_masked_context_has_no_influence_block_with_query_kv(models, example):
    batch, shape, mask, seed = example
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, *shape, 16, generator=gen)
    latents = torch.randn(batch, 4, 16, generator=gen)
    _assert_mask_has_no_influence(
        models["block"], lambda m, d: m(latents, context=d, mask=mask), data, mask, seed
    )


@given(st.integers(1, 3), st.integers(2, 10), st.integers(0, 2**16), st.booleans())
def test_permuting_inputs_without_positions_changes_nothing(models, batch, n, seed, masked):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, n, 3, generator=gen)
    mask = (torch.rand(batch, n, generator=gen) > 0.3) if masked else None
    perm = torch.randperm(n, generator=gen)
    model = models["perceiver_nopos"]
    with torch.no_grad():
        a = model(data, mask=mask)
        b = model(data[:, perm], mask=None if mask is None else mask[:, perm])
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_permuting_pixels_without_positions_changes_nothing(models, batch, h, w, seed):
    """A 2-D Perceiver without Fourier features treats its pixels as a set (with attention residuals too)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, h, w, 3, generator=gen)
    mask = torch.rand(batch, h, w, generator=gen) > 0.3
    perm = torch.randperm(h * w, generator=gen)
    shuffled = data.reshape(batch, h * w, 3)[:, perm].reshape(batch, h, w, 3)
    shuffled_mask = mask.reshape(batch, h * w)[:, perm].reshape(batch, h, w)
    model = models["perceiver_nopos_2d"]
    with torch.no_grad():
        torch.testing.assert_close(
            model(shuffled, mask=shuffled_mask), model(data, mask=mask), atol=1e-5, rtol=1e-5
        )


@given(st.integers(1, 3), st.integers(2, 8), st.integers(1, 6), st.integers(0, 2**16))
def test_perceiver_io_set_in_sequence_out(models, batch, n, m, seed):
    """PerceiverIO ignores the order of its inputs and its outputs follow the order of its queries."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, n, 6, generator=gen)
    queries = torch.randn(batch, m, 8, generator=gen)
    in_perm, q_perm = torch.randperm(n, generator=gen), torch.randperm(m, generator=gen)
    model = models["io"]
    with torch.no_grad():
        out = model(data, queries=queries)
        torch.testing.assert_close(model(data[:, in_perm], queries=queries), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model(data, queries=queries[:, q_perm]), out[:, q_perm], atol=1e-5, rtol=1e-5
        )


@given(masked_batch(max_batch=4, axes=2))
def test_samples_are_independent_of_the_batch_perceiver(models, example):
    batch, shape, mask, seed = example
    data = torch.randn(batch, *shape, 3, generator=torch.Generator().manual_seed(seed))
    model = models["perceiver"]
    with torch.no_grad():
        together = model(data, mask=mask)
        for i in range(batch):
            alone = model(data[i : i + 1], mask=mask[i : i + 1])
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)


@given(masked_batch(max_batch=4, axes=1, max_axis=8))
def test_samples_are_independent_of_the_batch_io_and_lm(models, example):
    batch, (n,), mask, seed = example
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(batch, n, 6, generator=gen)
    queries = torch.randn(3, 8, generator=gen)
    ids = torch.randint(0, 13, (batch, n), generator=gen)
    with torch.no_grad():
        io_all = models["io"](data, mask=mask, queries=queries)
        lm_all = models["lm"](ids, mask=mask)
        for i in range(batch):
            sl = slice(i, i + 1)
            torch.testing.assert_close(
                io_all[sl], models["io"](data[sl], mask=mask[sl], queries=queries), atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(lm_all[sl], models["lm"](ids[sl], mask=mask[sl]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_sample_gets_zeros_from_cross_attention(models, dtype):
    """Documented behaviour: no valid input → every cross-attention contributes zeros (before its output
    projection, so only ``to_out``'s bias reaches the residual); outputs and gradients stay finite."""
    model = copy.deepcopy(models["perceiver"]).to(dtype)
    captured = []
    hooks = [
        block.cross_attn.attn.to_out.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        for block in model.blocks
    ]
    data = torch.randn(2, 3, 4, 3, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1] = False  # sample 1 sees nothing
    out = model(data, mask=mask)
    out.float().sum().backward()
    for h in hooks:
        h.remove()
    assert len(captured) == 2  # one cross-attention per step (depth 2)
    for pre_out in captured:
        assert torch.all(pre_out[1] == 0)
        assert pre_out[0].abs().sum() > 0
    assert torch.isfinite(out).all()
    assert torch.isfinite(data.grad).all() and torch.all(data.grad[1] == 0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # ... and what the sample's (ignored) values are does not matter.
    with torch.no_grad():
        again = model(torch.randn_like(data) * 50, mask=mask)
    torch.testing.assert_close(again[1], out[1].detach())


@pytest.mark.parametrize("name", ["io", "lm"])
def test_fully_masked_sample_is_finite_io(models, name):
    model = models[name]
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    with torch.no_grad():
        if name == "io":
            out = model(torch.randn(2, 5, 6), mask=mask, queries=torch.randn(3, 8))
        else:
            out = model(torch.randint(0, 13, (2, 5)), mask=mask)
    assert torch.isfinite(out).all()
