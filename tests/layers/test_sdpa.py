"""``layers.sdpa``: SDPA's own results, and gradients of gradients (``create_graph=True``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perceivers.layers.sdpa import sdpa

CASES = {
    "plain": {},
    "mask": {"attn_mask": "bool"},
    "float mask": {"attn_mask": "float"},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
}


def _operands(dtype=torch.float64, q=3, k=5, d=4, dv=4):
    gen = torch.Generator().manual_seed(0)
    shapes = ((2, 2, q, d), (2, 2, k, d), (2, 2, k, dv))
    return [torch.randn(*s, generator=gen, dtype=dtype, requires_grad=True) for s in shapes]


def _options(case: str, q=3, k=5) -> dict:
    options = dict(CASES[case])
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = torch.rand(2, 1, q, k, generator=torch.Generator().manual_seed(1)) > 0.4
        options["attn_mask"][..., 0] = True
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = torch.randn(q, k, dtype=torch.float64)
    return options


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_are_sdpas(case):
    q, k, v = _operands(torch.float32)
    options = _options(case)
    if torch.is_tensor(options.get("attn_mask")) and options["attn_mask"].is_floating_point():
        options["attn_mask"] = options["attn_mask"].float()
    out = sdpa(q, k, v, **options)
    ref = F.scaled_dot_product_attention(q, k, v, **options)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), grad),
                                                 torch.autograd.grad(ref, (q, k, v), grad)))


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_of_gradients(case):
    """gradgradcheck in float64 (SDPA's fused CPU kernel in torch 2.13 has no derivative of its backward: "derivative
    for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    q, k, v = _operands()
    options = _options(case)
    assert torch.autograd.gradgradcheck(lambda q, k, v: sdpa(q, k, v, **options), (q, k, v))


def test_a_retained_graph_runs_backward_twice():
    q, k, v = _operands()
    out = sdpa(q, k, v).square().sum()
    first = torch.autograd.grad(out, (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_only_the_inputs_that_require_grad_get_one():
    q, k, v = _operands()
    k.requires_grad_(False)
    (gq, gv) = torch.autograd.grad(sdpa(q, k, v).sum(), (q, v))
    assert gq.shape == q.shape and gv.shape == v.shape
    with torch.no_grad():
        assert not sdpa(q, k, v).requires_grad


def test_keys_that_are_the_values():
    """Attending in the context's own space passes one tensor as keys and values: each gets its own gradient, with
    or without a graph of the gradients."""
    q, c, _ = _operands()
    for create_graph in (False, True):
        got = torch.autograd.grad(sdpa(q, c, c).square().sum(), (q, c), create_graph=create_graph)
        ref = torch.autograd.grad(F.scaled_dot_product_attention(q, c, c).square().sum(), (q, c))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
