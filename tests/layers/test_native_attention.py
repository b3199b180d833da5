"""The native fused attention kernel: values and gradients of softmax attention against float64, where it
is taken, and the layers that go through it."""

import functools

import pytest
import torch
import torch.nn.functional as F
from _attention_reference import heads as _heads
from _attention_reference import reference as _reference

from perceivers import kernels
from perceivers.layers import Attention, dense
from perceivers.layers import native_attention as na
from perceivers.layers import onednn_attention as oa

pytestmark = pytest.mark.skipif(not na.available(), reason="no C compiler: the native kernels are not built")


def _close(got, ref, tol=1e-5, sdpa=None):
    """Within ``tol`` of float64 (relative to the largest entry, at least 1), or at most twice as far as
    PyTorch's own float32 attention (``sdpa``) where cancellation makes the reference ~0."""
    assert got.shape == ref.shape and got.dtype == torch.float32
    error = (got.double() - ref).abs().max().item()
    bound = tol * max(ref.abs().max().item(), 1.0)
    if sdpa is not None:
        bound = max(bound, 2 * (sdpa.double() - ref).abs().max().item())
    assert error <= bound


def _sdpa(q, k, v, mask, scale, grad):
    """PyTorch's float32 attention: values and gradients of ``q, k, v``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("b, h, m, n, d, e", [
    (2, 8, 128, 2048, 32, 32),   # the reduced language model's cross-attention
    (2, 8, 300, 37, 32, 32),     # more queries than keys (the decoder): the backward loops the other way
    (1, 3, 37, 201, 16, 48),     # partial blocks of queries and keys, key and value widths differ
    (1, 2, 33, 129, 256, 256),   # the widest heads
    (1, 8, 100, 6200, 64, 64),   # keys and values past STREAM_BYTES: four query blocks per forward job (on ≤ 2 threads)
    (3, 1, 5, 1, 64, 64),        # one key
])
@pytest.mark.parametrize("mask_kind", [None, "keys", "per-head"])
def test_values_and_gradients_match_float64(b, h, m, n, d, e, mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = _heads(b, h, m, d, g), _heads(b, h, n, d, g), _heads(b, h, n, e, g)
    for t in (q, k, v):
        t.requires_grad_()
    mask = None
    if mask_kind is not None:
        mask = torch.rand(b, h if mask_kind == "per-head" else 1, 1, n, generator=g) > 0.3
        mask[..., 0] = True
        if n > 64:
            mask[0, ..., :64] = False  # a whole block of keys masked for one sample
            mask[0, ..., -1] = True
    assert na.applies(q, k, v, mask, 0.0)
    out = na.attend(q, k, v, mask, scale=0.2)
    assert "NativeAttention" in type(out.grad_fn).__name__
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    refs, sdpa = _reference(q, k, v, mask, 0.2, grad), _sdpa(q, k, v, mask, 0.2, grad)
    for got, ref, own in zip((out, q.grad, k.grad, v.grad), refs, sdpa):
        _close(got, ref, sdpa=own)
    if mask is not None:  # masked keys get exactly no gradient
        dead = ~mask.expand(b, h, 1, n)[:, :, 0]
        assert k.grad[dead].abs().sum() == 0 and v.grad[dead].abs().sum() == 0


@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_builds_for_narrower_vectors_match_float64(march, built_for):
    """Built for AVX2 (8-float vectors: other register tiles, the softmax in parts of 8 rows) and for SSE2
    (the same vectors without masked moves or movemask), the kernel passes the float64 comparison above."""
    built_for(march)
    for shape, mask_kind in (((1, 3, 37, 201, 16, 48), "keys"), ((2, 2, 300, 37, 80, 112), None),
                             ((1, 2, 33, 129, 256, 256), "per-head")):
        test_values_and_gradients_match_float64(*shape, mask_kind)
    assert march in " ".join(kernels._FLAGS) and kernels._loaded["attention"] is not None  # that build served it


@pytest.mark.parametrize("layout", ["shared", "contiguous"])
def test_keys_shared_by_every_head_and_other_layouts(layout):
    """The folded cross-attention's keys and values are one expanded tensor; queries may be contiguous."""
    g = torch.Generator().manual_seed(1)
    b, h, m, n, d = 2, 4, 70, 300, 32
    q = _heads(b, h, m, d, g, layout="contiguous" if layout == "contiguous" else "projection").requires_grad_()
    if layout == "shared":
        base = torch.randn(b, 1, n, d, generator=g, requires_grad=True)
        k = v = base.expand(b, h, n, d)
    else:
        base = torch.randn(b, h, n, d, generator=g, requires_grad=True)
        k = v = base
    out = na.attend(q, k, v)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref = _reference(q, base.expand(b, h, n, d), base.expand(b, h, n, d), None, d**-0.5, grad)
    _close(out, ref[0])
    _close(q.grad, ref[1])
    _close(base.grad, (ref[2] + ref[3]).sum(1, keepdim=True) if layout == "shared" else ref[2] + ref[3])


def test_a_row_without_keys_is_zero_and_gets_no_gradient():
    q, k, v = (torch.randn(1, 1, 3, 16, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    out = na.attend(q, k, v, mask)
    out.sum().backward()
    assert out.abs().max() == 0
    assert all(t.grad.abs().max() == 0 for t in (q, k, v))


def test_nan_reaches_the_rows_it_reaches_in_sdpa_and_large_scores_stay_exact():
    """A NaN key poisons every query row, a NaN query only its own (as in SDPA); scores of several hundred
    (where the exponential's scaling must not overflow or lose the row's maximum) match SDPA."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    k, v = k.repeat(1, 1, 5, 1), v.repeat(1, 1, 5, 1)  # 200 keys: two key blocks
    q[0, 0, 5, 0] = float("nan")
    k[0, 1, 150, 3] = float("nan")
    got = na.attend(q, k, v)
    assert torch.equal(got.isnan(), F.scaled_dot_product_attention(q, k, v).isnan())
    assert got[0, 0].isnan().any(-1).nonzero().flatten().tolist() == [5] and got[0, 1].isnan().all()
    q[0, 0, 5, 0], k[0, 1, 150, 3] = 0.0, 0.0
    q = q * 40  # scores up to several hundred
    torch.testing.assert_close(na.attend(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_a_row_without_keys_gets_finite_second_order_gradients():
    """``create_graph=True`` (the differentiable backward) gives the same zero gradients for a row with no key,
    and its own gradients are finite."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (_heads(2, 1, n, 16, g).requires_grad_() for n in (3, 5, 5))
    mask = torch.tensor([True, False]).view(2, 1, 1, 1).expand(2, 1, 1, 5)  # sample 1: every key masked
    grads = torch.autograd.grad(na.attend(q, k, v, mask).sum(), (q, k, v), create_graph=True)
    plain = torch.autograd.grad(na.attend(q, k, v, mask).sum(), (q, k, v))
    for got, want in zip(grads, plain):
        assert got[1].abs().max() == 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    second = torch.autograd.grad(sum(gr.square().sum() for gr in grads), (q, k, v))
    assert all(t.isfinite().all() for t in second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where, value", [("k", float("nan")), ("q", float("nan")), ("k", float("inf"))])
def test_nan_and_inf_scores_reach_the_output_as_in_pytorch(dtype, where, value):
    """A NaN in a query or key, or an infinite key, makes the rows it touches NaN, as PyTorch's attention does
    (a diverged weight must not give finite outputs), and only those."""
    if dtype == torch.bfloat16 and not na.available_bf16():
        pytest.skip("no AVX512-BF16")
    g = torch.Generator().manual_seed(5)
    q, k, v = (_heads(1, 1, n, 32, g).to(dtype).requires_grad_() for n in (4, 40, 40))
    with torch.no_grad():
        (k if where == "k" else q)[0, 0, 2, 3] = value
    assert na.applies(q, k, v, None, 0.0)
    out = na.attend(q, k, v)
    a, b, c = (t.detach().double() for t in (q, k, v))
    ref = torch.softmax(a @ b.transpose(-1, -2) * 32**-0.5, -1) @ c  # NaN rows: +inf or NaN scores
    assert ref.isnan().any() and (out.isnan() == ref.isnan()).all()
    out.sum().backward()
    assert v.grad.isnan().any()


def test_masks_the_kernel_cannot_read_in_place_go_to_sdpa():
    """A key mask broadcast over the keys (``[B, 1, 1, 1]``), or one that does not fit the keys or the batch,
    is left to SDPA (which broadcasts or refuses it); the kernel reads ``[B|1, H|1, 1, N]`` masks only."""
    from perceivers.layers.attention import attend_heads

    g = torch.Generator().manual_seed(6)
    q, k, v = (_heads(2, 2, n, 32, g) for n in (5, 300, 300))
    every = torch.ones(2, 1, 1, 1, dtype=torch.bool)
    assert not na.applies(q, k, v, every, 0.0)
    torch.testing.assert_close(attend_heads(q, k, v, every, 0.0), F.scaled_dot_product_attention(q, k, v))
    for bad in (torch.ones(3, 1, 1, 300, dtype=torch.bool), torch.ones(2, 1, 1, 301, dtype=torch.bool),
                torch.ones(2, 3, 1, 300, dtype=torch.bool)):
        assert not na.applies(q, k, v, bad, 0.0)
        with pytest.raises(RuntimeError):
            attend_heads(q, k, v, bad, 0.0)
    assert na.applies(q, k, v, torch.ones(2, 2, 1, 300, dtype=torch.bool), 0.0)


@pytest.mark.parametrize("trainable", ["q", "kv", "v"])
def test_only_the_asked_gradients(trainable):
    g = torch.Generator().manual_seed(4)
    q, k, v = _heads(1, 2, 100, 64, g), _heads(1, 2, 90, 64, g), _heads(1, 2, 90, 64, g)
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in trainable)
    out = na.attend(q, k, v)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref = _reference(q, k, v, None, 64**-0.5, grad)
    for name, t, r in zip("qkv", (q, k, v), ref[1:]):
        if name in trainable:
            _close(t.grad, r)
        else:
            assert t.grad is None


@pytest.mark.parametrize("channels", ["contiguous", "strided"])
def test_second_order_gradients_match_written_out_attention(channels):
    """``create_graph=True`` differentiates through the inputs themselves, also where the kernel reads a
    contiguous copy of them (channels with a stride)."""
    g = torch.Generator().manual_seed(2)
    width = 16 if channels == "contiguous" else 32
    leaves = [_heads(1, 2, 20, width, g).requires_grad_() for _ in range(3)]
    q, k, v = (t if channels == "contiguous" else t[..., ::2] for t in leaves)
    mask = torch.rand(1, 1, 1, 20, generator=g) > 0.3
    mask[..., 0] = True
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))

    def penalty(attend):
        out = attend(q, k, v)
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(gr.square().sum() for gr in grads), leaves)

    got = penalty(lambda *t: na.attend(*t, mask))
    ref = penalty(lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2) * 16**-0.5 + bias, -1) @ c)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case, expected", [
    ("narrow heads", True),
    ("wide heads", True),
    ("keys and values of different widths", True),
    ("width not a multiple of 16", False),  # the folded context padded to 8 (e.g. 264): oneDNN or SDPA
    ("wider than 256", False),
    ("bfloat16", None),  # where the processor has AVX512-BF16 (the bfloat16 kernel)
    ("bfloat16 under autocast", None),
    ("bfloat16, wide heads in training", False),  # the blocked bf16 products keep the probabilities
    ("float64", False),
    ("autocast", False),
    ("dropout", False),
    ("query-dependent mask", False),
    ("float mask", False),
    ("disabled", False),
    ("FLOP counter", False),
])
def test_where_it_applies(case, expected, monkeypatch):
    d, e = {"wide heads": (128, 128), "keys and values of different widths": (32, 160),
            "width not a multiple of 16": (264, 264), "wider than 256": (320, 320),
            "bfloat16, wide heads in training": (64, 64)}.get(case, (32, 32))
    dtype = torch.bfloat16 if case.startswith("bfloat16") else torch.float64 if case == "float64" else torch.float32
    expected = na.available_bf16() if expected is None else expected
    q, k, v = torch.randn(2, 8, 64, d, dtype=dtype), torch.randn(2, 8, 96, d, dtype=dtype), torch.randn(2, 8, 96, e, dtype=dtype)
    q.requires_grad_(case.endswith("training"))
    mask = {"query-dependent mask": torch.ones(2, 1, 64, 96, dtype=torch.bool),
            "float mask": torch.zeros(2, 1, 1, 96)}.get(case)
    if case == "disabled":
        monkeypatch.setenv("PERCEIVERS_NATIVE", "0")
    if case == "FLOP counter":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False):
            assert na.applies(q, k, v, mask, 0.0) == expected
        return
    with torch.autocast("cpu", enabled=case.endswith("autocast")):
        assert na.applies(q, k, v, mask, 0.1 if case == "dropout" else 0.0) == expected


def test_function_transforms_and_forward_mode_see_sdpa():
    import torch.autograd.forward_ad as fwad
    from torch.func import vmap

    q, k, v = (torch.randn(2, 2, 64, 32) for _ in range(3))
    assert na.applies(q, k, v, None, 0.0)
    assert not vmap(lambda t: torch.tensor(na.applies(q, k, v, None, 0.0)))(torch.zeros(2)).any()
    with fwad.dual_level():
        assert not na.applies(q, k, v, None, 0.0)


@pytest.mark.parametrize("fold", [False, True])
def test_attention_layer_goes_through_it_and_matches_sdpa(fold, monkeypatch):
    """The README model's layers: latent self-attention (8 heads of 64) and the folded cross-attention over
    an RGB context (29 channels padded to 32, shared by the heads), key-masked, in training."""
    torch.manual_seed(3)
    if fold:
        layer = Attention(q_dim=64, kv_dim=29, num_heads=1, qk_channels=64, v_channels=64)
        layer.fold_kv = True
        x, context = torch.randn(2, 40, 64, requires_grad=True), torch.randn(2, 300, 29, requires_grad=True)
    else:
        layer = Attention(q_dim=512, num_heads=8, qk_channels=512, v_channels=512)
        x, context = torch.randn(2, 100, 512, requires_grad=True), None
    mask = torch.rand(2, 300 if fold else 100) > 0.2
    calls = []
    original = na.attend
    monkeypatch.setattr(na, "attend", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    outs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(na, "applies", lambda *a, **kw: False)
            monkeypatch.setattr(oa, "applies", lambda *a, **kw: False)  # SDPA itself
        out = layer(x, context, mask=mask)
        out.square().mean().backward()
        outs.append((out.detach(), x.grad.clone(), layer.to_q.weight.grad.clone(),
                     *([] if context is None else [context.grad.clone()])))
        x.grad = None
        if context is not None:
            context.grad = None
        layer.zero_grad()
        assert len(calls) == 1  # the native pass only
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


bf16 = pytest.mark.skipif(not na.available_bf16(), reason="the processor has no AVX512-BF16 dot products")


@bf16
@pytest.mark.parametrize("b, h, m, n, d, e", [
    (2, 8, 128, 2048, 32, 32),   # the reduced language model's cross-attention
    (2, 8, 300, 37, 32, 32),     # more queries than keys: an odd last pair of keys, the backward's other loop
    (1, 3, 37, 201, 16, 48),     # partial blocks, key and value widths differ (48: a 32- and a 16-channel tile)
    (1, 2, 33, 129, 256, 256),   # the widest heads
    (1, 8, 70, 24700, 32, 32),   # keys and values past STREAM_BYTES: three query blocks in a job of four (≤ 2 threads)
    (3, 1, 5, 1, 64, 64),        # one key
])
@pytest.mark.parametrize("mask_kind", [None, "keys"])
def test_bfloat16_values_and_gradients(b, h, m, n, d, e, mask_kind):
    """bfloat16 in and out, against float64 on the same bfloat16 inputs: within 2⁻⁷ of the largest entry
    (at least 1; two units of bfloat16's rounding), or at most 1.25x as far as the peers' bfloat16
    attention (the widest heads' query gradients, from score gradients rounded to bfloat16 as theirs)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (t.bfloat16().requires_grad_() for t in (_heads(b, h, m, d, g), _heads(b, h, n, d, g), _heads(b, h, n, e, g)))
    mask = None
    if mask_kind is not None:
        mask = torch.rand(b, 1, 1, n, generator=g) > 0.3
        mask[..., 0] = True
        if n > 64:
            mask[0, ..., :64] = False
            mask[0, ..., -1] = True
    assert na.applies(*(t.detach() for t in (q, k, v)), mask, 0.0)  # in training: narrow heads only
    out = na.attend(q, k, v, mask, scale=0.2)
    assert out.dtype == torch.bfloat16 and "NativeAttention" in type(out.grad_fn).__name__
    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    refs, peers = _reference(q, k, v, mask, 0.2, grad), _reference(q, k, v, mask, 0.2, grad, torch.bfloat16)
    for got, ref, peer in zip((out, q.grad, k.grad, v.grad), refs, peers):
        assert got.dtype == torch.bfloat16
        error = (got.double() - ref).abs().max().item()
        assert error <= max(2**-7 * max(ref.abs().max().item(), 1.0), 1.25 * (peer - ref).abs().max().item())
    if mask is not None:
        dead = ~mask.expand(b, h, 1, n)[:, :, 0]
        assert k.grad[dead].abs().sum() == 0 and v.grad[dead].abs().sum() == 0


@bf16
def test_bfloat16_second_order_gradients():
    """``create_graph=True`` on bfloat16 heads with a key mask: the gradients of the gradients, in bfloat16,
    as those of the same attention written out in bfloat16 (to bfloat16's rounding)."""
    g = torch.Generator().manual_seed(7)
    leaves = [torch.randn(1, 2, 20, 16, generator=g).bfloat16().requires_grad_() for _ in range(3)]
    mask = torch.rand(1, 1, 1, 20, generator=g) > 0.3
    mask[..., 0] = True
    bias = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))

    def penalty(attend):
        grads = torch.autograd.grad(attend(*leaves).float().square().sum(), leaves, create_graph=True)
        assert all(t.dtype == torch.bfloat16 for t in grads)
        return torch.autograd.grad(sum(t.float().square().sum() for t in grads), leaves)

    got = penalty(lambda *t: na.attend(*t, mask))
    ref = penalty(lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2) * 16**-0.5 + bias, -1) @ c)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2 * b.abs().max().item())


@bf16
@pytest.mark.parametrize("amx", [False, True])
def test_bfloat16_autocast_layer_goes_through_it(amx, monkeypatch):
    """A latent self-attention under CPU autocast: its heads reach the bfloat16 kernel, and its values and
    gradients stay as close to float64 as the bfloat16 products' path (the kernel off). On processors with AMX
    (oneDNN's bfloat16 products faster than the kernel's dot products) they go past it."""
    monkeypatch.setattr(kernels, "has_amx", lambda: amx)
    # oneDNN's bfloat16 default reads it too: a cache of its own for this test, the real one restored after
    monkeypatch.setattr(dense, "_default_bf16", functools.cache(dense._default_bf16.__wrapped__))
    torch.manual_seed(5)
    layer = Attention(q_dim=256, num_heads=8, qk_channels=256, v_channels=256)  # 32 + 32: taken in training
    x = torch.randn(2, 96, 256, requires_grad=True)
    reference = layer.double()(x.double())
    ref_grad = torch.autograd.grad(reference.square().mean(), x)[0]
    layer.float()
    errors, calls, original = [], [], na.attend
    for native in (True, False):
        calls.clear()
        with pytest.MonkeyPatch.context() as patch:
            if not native:
                patch.setattr(na, "available_bf16", lambda: False)
            patch.setattr(na, "attend", lambda *a, **kw: calls.append(a[0].dtype) or original(*a, **kw))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x)
            grad = torch.autograd.grad(out.float().square().mean(), x)[0]
            assert calls == ([torch.bfloat16] if native and not amx else [])
        errors.append(((out.double() - reference).abs().max().item(), (grad.double() - ref_grad).abs().max().item()))
    (out_native, grad_native), (out_blocked, grad_blocked) = errors
    assert out_native <= 1.5 * out_blocked and grad_native <= 1.5 * grad_blocked


@pytest.mark.parametrize("mask_kind", [None, "keys"])
def test_bfloat16_heads_in_float32_where_bfloat16_is_emulated(mask_kind, monkeypatch):
    """Where bfloat16 products would be emulated (``PERCEIVERS_BF16_AS_FLOAT32=1`` forces it on any processor),
    bfloat16 heads are attended in float32, as SDPA's own bfloat16 CPU kernel computes (the float32 kernel where it
    is built): the result and the gradients within one bfloat16 rounding of float64 on the same bfloat16 inputs."""
    from perceivers.layers.attention import attend_heads

    monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", "1")
    g = torch.Generator().manual_seed(2)
    q, k, v = (t.bfloat16().requires_grad_() for t in (_heads(2, 4, 40, 32, g), _heads(2, 4, 300, 32, g),
                                                       _heads(2, 4, 300, 48, g)))
    mask = None
    if mask_kind is not None:
        mask = torch.rand(2, 1, 1, 300, generator=g) > 0.3
        mask[..., 0] = True
    calls, original = [], na._forward
    monkeypatch.setattr(na, "_forward", lambda *a, **kw: calls.append(a[0].dtype) or original(*a, **kw))
    out = attend_heads(q, k, v, mask, 0.0, scale=0.2)
    assert out.dtype == torch.bfloat16 and calls == ([torch.float32] if na.available() else [])
    if na.available():  # the backward keeps the bfloat16 heads and output, not the widened ones
        assert "WidenedAttention" in type(out.grad_fn).__name__
        assert all(t.dtype == torch.bfloat16 for t in out.grad_fn.saved_tensors[:3] + out.grad_fn.saved_tensors[4:5])
    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    for got, ref in zip((out, q.grad, k.grad, v.grad), _reference(q, k, v, mask, 0.2, grad), strict=True):
        assert got.dtype == torch.bfloat16
        assert (got.double() - ref).abs().max() <= 2**-8 * ref.abs().max()


def test_bfloat16_heads_in_float32_second_order(monkeypatch):
    """``create_graph=True`` through bfloat16 heads attended in float32: the gradients of the gradients match
    float64 attention on the same bfloat16 inputs to bfloat16's rounding."""
    from perceivers.layers.attention import attend_heads

    monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", "1")
    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(1, 2, 20, 16, generator=g).bfloat16().requires_grad_() for _ in range(3)]

    def penalty(attend, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        grads = torch.autograd.grad(attend(*inputs).float().square().sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(t.float().square().sum() for t in grads), inputs)

    got = penalty(lambda *t: attend_heads(*t, None, 0.0), torch.bfloat16)
    ref = penalty(lambda a, b, c: torch.softmax(a @ b.transpose(-1, -2) * 16**-0.5, -1) @ c, torch.float64)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=0.0, atol=2**-6 * b.abs().max().item())


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffers_do_not_follow_the_default_dtype(default, dtype, default_dtype):
    """Lightning's bf16-true training sets the default dtype to bfloat16: the key bias and the gradients'
    buffers the kernels write must stay float32 (read as bfloat16 they were garbage, and half-sized)."""
    if dtype == torch.bfloat16 and not na.available_bf16():
        pytest.skip("the processor has no AVX512-BF16 dot products")
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g, dtype=dtype) for n in (4, 10, 10))
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 6:] = False

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = na.attend(*leaves, mask)
        out.float().square().sum().backward()
        return out, *(t.grad for t in leaves)

    want = run()
    with default_dtype(default):
        got = run()
    for a, b in zip(got, want):
        assert a.dtype == dtype and torch.equal(a, b)


def test_no_compiler_falls_back(no_compiler):
    q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
    assert not na.applies(q, k, v, None, 0.0)
    layer = Attention(q_dim=64, num_heads=2, qk_channels=64, v_channels=64)
    assert torch.isfinite(layer(torch.randn(1, 64, 64))).all()


def test_loaded_without_signatures_first(monkeypatch):
    """A caller that loads the library bare (as a test's skip condition may) leaves the signatures to the
    first caller that names them."""
    monkeypatch.setattr(kernels, "_loaded", {})
    assert kernels.load("attention").perceivers_attention.argtypes is None
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    torch.testing.assert_close(na.attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("masked", [False, True])
def test_operators_pass_opcheck(masked):
    """The ``perceivers::native_attention`` operators that ``torch.compile`` keeps: schema, fake tensors, autograd
    registration and AOT dispatch (``torch.library.opcheck``); the key mask comes as its additive bias."""
    g = torch.Generator().manual_seed(5)
    q, k, v = _heads(2, 3, 37, 32, g), _heads(2, 3, 70, 32, g), _heads(2, 3, 70, 48, g)
    for t in (q, k, v):
        t.requires_grad_()
    mask = torch.rand(2, 1, 1, 70, generator=g) > 0.3 if masked else None
    args = (q, k, v, na._bias(mask), 0.3)
    torch.library.opcheck(na._attention_op, args)
    with torch.no_grad():
        out, lse = na._attention_op(*args)
    dout = torch.randn(out.shape, generator=g)
    torch.library.opcheck(na._attention_backward_op, (dout, *(t.detach() for t in (q, k, v)), args[3], out, lse, 0.3,
                                                      True, False, True))


def test_compiled_layers_keep_the_kernel(monkeypatch):
    """Under ``torch.compile(fullgraph=True)`` float32 heads go through the kernel as operators, forward and
    backward (where SDPA served before): outputs and gradients equal eager mode's, which takes the kernel too."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(na, f"_{name}")
        monkeypatch.setattr(na, f"_{name}", lambda *a, _real=real, _name=name: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a))
    torch.manual_seed(3)
    layer = Attention(q_dim=64, num_heads=2, qk_channels=64, v_channels=64)
    x = torch.randn(2, 40, 64)
    mask = torch.rand(2, 40) > 0.2
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    want = layer(x, mask=mask)
    grads = torch.autograd.grad(want.square().sum(), list(layer.parameters()))
    assert calls == {"forward": 1, "backward": 1}
    got = compiled(x, mask=mask)
    assert calls["forward"] == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), list(layer.parameters())), grads,
                               rtol=1e-5, atol=1e-6)
    assert calls["backward"] == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("masked", [False, True])
def test_operators_without_the_kernel_compute_the_same_in_pytorch(monkeypatch, masked):
    """Where the kernel is not served (a program exported with the operator, run with the kernel off, not built, on a
    processor without AVX-512 or on another device), the operators compute the same output, log-sum-exp and
    gradients in PyTorch operations (a row with every key masked: zeros), and pass ``opcheck`` that way too."""
    g = torch.Generator().manual_seed(6)
    q, k, v = _heads(2, 3, 37, 32, g), _heads(2, 3, 70, 32, g), _heads(2, 3, 70, 48, g)
    for t in (q, k, v):
        t.requires_grad_()
    mask = torch.rand(2, 1, 1, 70, generator=g) > 0.3 if masked else None
    if masked:
        mask[1] = False  # the second sample has no key left
    args = (q, k, v, na._bias(mask), 0.3)
    dout = torch.randn(2, 3, 37, 48, generator=g)
    results = []
    for served in (True, False):
        monkeypatch.setattr(na, "available", lambda served=served: served)
        out, lse = na._attention_op(*args)
        results.append((out, lse if not masked else lse[0], *torch.autograd.grad(out, (q, k, v), dout)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if masked:
        assert results[1][0][1].abs().max() == 0
    torch.library.opcheck(na._attention_op, args)
    with torch.no_grad():
        out, lse = na._attention_op(*args)
    torch.library.opcheck(na._attention_backward_op, (dout, *(t.detach() for t in (q, k, v)), args[3], out, lse, 0.3,
                                                      True, True, False))
