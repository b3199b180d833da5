"""Grouped-product attention for heads wider than CUDA's fused kernels (``perceivers.layers.wide_attention``).

The function is device-agnostic, so its numerics are checked here on the CPU against attention written out
(float64, several groups); ``applies`` routes to it on CUDA only (tests/parity/test_cuda.py runs it there).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from perceivers.layers import wide_attention


def _written_out(q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def _operands(dtype=torch.float64, b=3, h=2, m=5, n=7, d=6, dv=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for shape in
            ((b, h, m, d), (b, h, n, d), (b, h, n, dv))]


@pytest.mark.parametrize("group_bytes", [1, 5 * 7 * 8 * 4, 2**30])  # one head per group, four, all
@pytest.mark.parametrize("scale", [None, 0.3])
def test_outputs_and_gradients_match_attention_written_out(group_bytes, scale):
    q, k, v = _operands()
    cotangent = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    got = wide_attention.attend(q, k, v, scale, group_bytes=group_bytes)
    grads = torch.autograd.grad(got, (q, k, v), cotangent)
    want = _written_out(q, k, v, scale)
    want_grads = torch.autograd.grad(want, (q, k, v), cotangent)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_shared_keys_and_values_sum_their_gradients():
    """Folded attention passes the context as both keys and values."""
    q, c, _ = _operands(dv=6)
    got = torch.autograd.grad(wide_attention.attend(q, c, c, group_bytes=1).sum(), c)[0]
    want = torch.autograd.grad(_written_out(q, c, c).sum(), c)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_second_derivatives():
    q, k, v = (t.detach()[:1, :1, :3, :3].clone().requires_grad_() for t in _operands(d=3, dv=3))

    def fn(*args):
        return wide_attention.attend(*args, group_bytes=1)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_counts_the_products_of_a_fused_kernel():
    """Seven products of equal cost, as PyTorch's formula counts CUDA's fused kernels: two forward and five
    backward (the scores recomputed), against the six of attention written out, whose forward keeps them."""
    q, k, v = (t.detach().float().requires_grad_() for t in _operands(m=8, n=16, d=8, dv=8))
    with FlopCounterMode(display=False) as ours:
        wide_attention.attend(q, k, v, group_bytes=1).sum().backward()
    with FlopCounterMode(display=False) as written:
        _written_out(q, k, v).sum().backward()
    assert ours.get_total_flops() * 6 == written.get_total_flops() * 7 > 0


def test_autocast_casts_the_operands_as_sdpa():
    q, k, v = (t.detach().float() for t in _operands())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wide_attention.attend(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _written_out(q, k, v), rtol=3e-2, atol=3e-2)


def test_mixed_dtypes_outside_autocast_are_refused():
    q, k, v = _operands()
    with pytest.raises(ValueError, match="share a dtype"):
        wide_attention.attend(q.float(), k, v)


def test_applies_only_to_trained_wide_heads_on_cuda(monkeypatch):
    q, k, v = (torch.randn(1, 1, 4, 264, requires_grad=True) for _ in range(3))
    assert not wide_attention.applies(q, k, v, None, 0.0)  # the CPU has its own kernels
    monkeypatch.setattr(wide_attention, "_on_cuda", lambda t: True)  # the rule itself, as on a CUDA device
    assert wide_attention.applies(q, k, v, None, 0.0)
    assert not wide_attention.applies(q[..., :256], k[..., :256], v[..., :256], None, 0.0)  # the fused kernels
    assert not wide_attention.applies(q, k, v, None, 0.1)  # dropout: SDPA
    assert not wide_attention.applies(q, k, v, torch.ones(1, 1, 1, 4, dtype=torch.bool), 0.0)  # masks: SDPA
    with torch.no_grad():
        assert not wide_attention.applies(q, k, v, None, 0.0)  # inference: SDPA's bounded memory
    monkeypatch.setattr(wide_attention, "GROUP_BYTES", 4 * 4 * 4 - 1)
    assert not wide_attention.applies(q, k, v, None, 0.0)  # one head's scores over a group: SDPA
