"""Attention on oneDNN per head: the values and gradients of softmax attention, taken only where it applies."""

import pytest
import torch
import torch.nn.functional as F
from _attention_reference import heads as _heads
from _attention_reference import reference as _reference

from perceivers.layers import Attention, use_onednn
from perceivers.layers import native_attention as na
from perceivers.layers import onednn_attention as oa

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.fixture
def onednn_on():
    """oneDNN serves the products and attention (the default on AMD processors only)."""
    with use_onednn(True):
        yield


@pytest.fixture(autouse=True)
def _without_native_attention(monkeypatch):
    """Layers take the native kernel first where it is built (see test_native_attention.py): off here, so
    that they reach this path as they do without a C compiler; and bfloat16 stays bfloat16 on processors
    without bfloat16 arithmetic (``dense.bf16_in_float32``)."""
    monkeypatch.setattr(na, "applies", lambda *args, **kwargs: False)
    monkeypatch.setenv("PERCEIVERS_BF16_AS_FLOAT32", "0")


@pytest.mark.parametrize("mask_kind", [None, "keys", "per-head"])
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_values_and_gradients_match_float64(mask_kind, chunks, monkeypatch):
    """Keys in one chunk (a softmax) or in several (running maximum and sum; the backward recomputes the
    probabilities per chunk from the log-sum-exp), the first chunk masked whole for one sample."""
    if chunks == "several":
        monkeypatch.setattr(oa, "_MIN_CHUNK", 1)
        monkeypatch.setattr(oa, "_CHUNK_SCORES", 512 * 48)  # 6 chunks of <= 48 keys
    g = torch.Generator().manual_seed(0)
    b, h, m, n, d, e = 2, 3, 512, 256, 64, 160
    q, k, v = _heads(b, h, m, d, g), _heads(b, h, n, d, g), _heads(b, h, n, e, g)
    for t in (q, k, v):
        t.requires_grad_()
    mask = None
    if mask_kind is not None:
        mask = torch.rand(b, h if mask_kind == "per-head" else 1, 1, n, generator=g) > 0.3
        mask[0, ..., :48] = False
    with use_onednn(True):
        assert oa.applies(q, k, v, mask, 0.0)
        out = oa.attend(q, k, v, mask, scale=0.1)
    assert "OneDNNAttention" in type(out.grad_fn).__name__
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    for got, ref in zip((out, q.grad, k.grad, v.grad), _reference(q, k, v, mask, 0.1, grad)):
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    if mask is not None:  # masked keys get no gradient
        dead = ~mask.expand(b, h, 1, n)[:, :, 0]
        assert k.grad[dead].abs().max() == 0 and v.grad[dead].abs().max() == 0


def test_keys_and_values_broadcast_over_heads():
    """The folded cross-attention passes one context expanded over the heads as both keys and values."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 256, 136, generator=g, requires_grad=True)
    context = torch.randn(2, 1024, 136, generator=g, requires_grad=True)
    c = context[:, None].expand(-1, 4, -1, -1)
    with use_onednn(True):
        assert oa.applies(q, c, c, None, 0.0)
        out = oa.attend(q, c, c)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref = F.scaled_dot_product_attention(q.detach().double(), c.detach().double(), c.detach().double())
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    q2, ctx2 = q.detach().double().requires_grad_(), context.detach().double().requires_grad_()
    c2 = ctx2[:, None].expand(-1, 4, -1, -1)
    F.scaled_dot_product_attention(q2, c2, c2).backward(grad.double())
    for got, ref in ((q.grad, q2.grad), (context.grad, ctx2.grad)):
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_second_order_gradients_match_written_out_attention():
    """``create_graph=True`` (the fused CPU kernel has no second derivative; ours has)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 512, 128, generator=g, requires_grad=True) for _ in range(3))
    results = []
    for enabled in (True, False):
        with use_onednn(enabled):
            assert oa.applies(q, k, v, None, 0.0) == enabled
            out = oa.attend(q, k, v) if enabled else ((q @ k.transpose(-1, -2)) / 128**0.5).softmax(-1) @ v
        (gq,) = torch.autograd.grad(out.tanh().sum(), q, create_graph=True)
        results.append(torch.autograd.grad(gq.pow(2).sum(), (q, k, v)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _shapes(b=2, h=8, m=512, n=512, d=128, e=128, dtype=torch.float32):
    """Expanded views: the checks look at shapes only, nothing is allocated at full size."""
    return (torch.zeros(1, 1, 1, 1, dtype=dtype).expand(b, h, m, d), torch.zeros(1, 1, 1, 1, dtype=dtype).expand(b, h, n, d),
            torch.zeros(1, 1, 1, 1, dtype=dtype).expand(b, h, n, e))


@pytest.mark.parametrize("case, expected", [
    ("wide heads", True),
    ("narrow heads", False),      # d_k + d_v = 128: the fused kernel's single pass wins
    ("narrow heads, long keys", True),     # 128 over 4096 keys and more: chunks of keys win
    ("narrower heads, long keys", False),  # 64 over 4096 keys: the fused kernel
    ("few scores", False),        # 256 x 256 per head: per-call overhead
    ("long keys", True),          # 512 x 65536 per head: in chunks of 1024 keys
    ("huge scores", False),       # 65536 x 512 per head: chunks of 256 keys hold 2**24 scores
    ("huge scores, bfloat16", False),  # 512 x 65536 per head: bfloat16 holds them all
    ("dropout", False),
    ("float64", False),
    ("query-dependent mask", False),
    ("disabled", False),
    ("autocast", False),
])
def test_where_it_applies(case, expected):
    shapes = {"narrow heads": {"d": 64, "e": 64}, "few scores": {"m": 256, "n": 256}, "long keys": {"n": 65536},
              "huge scores": {"m": 65536}, "huge scores, bfloat16": {"n": 65536, "dtype": torch.bfloat16},
              "narrow heads, long keys": {"m": 256, "n": 4096, "d": 64, "e": 64},
              "narrower heads, long keys": {"m": 256, "n": 16384, "d": 32, "e": 32},
              "float64": {"dtype": torch.float64}}.get(case, {})
    q, k, v = _shapes(**shapes)
    mask = torch.ones(2, 1, 512, 512, dtype=torch.bool) if case == "query-dependent mask" else None
    dropout = 0.1 if case == "dropout" else 0.0
    with use_onednn(case != "disabled"), torch.autocast("cpu", enabled=case == "autocast"):
        assert oa.applies(q, k, v, mask, dropout) == expected


def test_attention_module_takes_it_and_matches_the_fused_kernel():
    """DeepMind-style wide heads (the vision model's latent self-attention, reduced in width)."""
    torch.manual_seed(3)
    layer = Attention(q_dim=256, num_heads=2, qk_channels=256, v_channels=256)
    x = torch.randn(2, 512, 256, requires_grad=True)
    mask = torch.rand(2, 512) > 0.2
    outs = []
    for enabled in (True, False):
        with use_onednn(enabled):
            out = layer(x, mask=mask)
            out.square().mean().backward()
        outs.append((out.detach(), x.grad.clone(), layer.to_k.weight.grad.clone()))
        x.grad = None
        layer.zero_grad()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("trainable", ["q", "kv", "v"])
def test_only_the_asked_gradients(trainable):
    """Frozen queries or keys/values (a frozen encoder, fixed queries) get no gradient computed."""
    g = torch.Generator().manual_seed(4)
    q, k, v = _heads(1, 2, 512, 96, g), _heads(1, 2, 512, 96, g), _heads(1, 2, 512, 96, g)
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in trainable)
    with use_onednn(True):
        out = oa.attend(q, k, v)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    ref = _reference(q, k, v, None, 96**-0.5, grad)
    for name, t, r in zip("qkv", (q, k, v), ref[1:]):
        if name in trainable:
            assert (t.grad.double() - r).abs().max() <= 1e-5 * r.abs().max()
        else:
            assert t.grad is None


def test_function_transforms_and_forward_mode_see_the_fused_kernel():
    """vmap (e.g. per-sample gradients) and forward-mode AD: the plain path, which supports them."""
    import torch.autograd.forward_ad as fwad
    from torch.func import vmap

    q, k, v = _shapes()
    with use_onednn(True):
        assert oa.applies(q, k, v, None, 0.0)
        assert not vmap(lambda t: torch.tensor(oa.applies(q, k, v, None, 0.0)))(torch.zeros(2)).any()
        with fwad.dual_level():
            assert not oa.applies(q, k, v, None, 0.0)
    torch.manual_seed(5)
    layer = Attention(q_dim=256, num_heads=2, qk_channels=256, v_channels=256)
    x = torch.randn(2, 512, 256)
    with use_onednn(True):
        batched = vmap(lambda xi: layer(xi[None])[0])(x)
    torch.testing.assert_close(batched, layer(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_kind", [None, "per-head"])
def test_compiled_graphs_keep_it_as_an_operator(mask_kind):
    """Under ``torch.compile`` it is one ``perceivers::`` operator each way, with the same values and
    gradients (frozen keys included); exported graphs see SDPA."""
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(6)
    b, h, m, n, d, e = 1, 2, 512, 384, 32, 160
    q, k, v = _heads(b, h, m, d, g).requires_grad_(), _heads(b, h, n, d, g), _heads(b, h, n, e, g).requires_grad_()
    mask = None if mask_kind is None else torch.rand(b, h, 1, n, generator=g) > 0.3
    grad = torch.randn(b, h, m, e, generator=g)

    def step(q, k, v):
        return (oa.attend(q, k, v, mask, scale=0.2) * grad).sum()

    with use_onednn(True):
        (_, code) = run_and_get_code(lambda: torch.compile(step, fullgraph=True)(q, k, v).backward())
    source = "\n".join(code)
    assert "perceivers.onednn_attention.default" in source and "perceivers.onednn_attention_backward" in source
    ref = _reference(q, k, v, mask, 0.2, grad)
    for got, r in ((q.grad, ref[1]), (v.grad, ref[3])):
        assert (got.double() - r).abs().max() <= 1e-5 * r.abs().max()
    # the backward operator computes only the asked gradients: the frozen keys' comes back empty
    bias = None if mask is None else torch.zeros(b, h, 1, n).masked_fill_(~mask, float("-inf"))
    out, lse = torch.ops.perceivers.onednn_attention(q.detach(), k, v.detach(), bias, 0.2)
    dq, dk, dv = torch.ops.perceivers.onednn_attention_backward(grad, q.detach(), k, v.detach(), bias, 0.2,
                                                                out, lse, True, False, True)
    assert dk.numel() == 0
    for got, r in ((dq, ref[1]), (dv, ref[3])):
        assert (got.double() - r).abs().max() <= 1e-5 * r.abs().max()

    layer = Attention(q_dim=256, num_heads=2, qk_channels=64, v_channels=320)
    with use_onednn(True):
        program = torch.export.export(layer, (torch.randn(1, 512, 256),))
    targets = {str(node.target) for node in program.graph_module.graph.nodes}
    assert not any("perceivers" in t for t in targets)


# ---------------------------------------------------------------------------- bfloat16


def _relative_error(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.usefixtures("onednn_on")
@pytest.mark.parametrize("mask_kind", [None, "keys", "per-head"])
@pytest.mark.parametrize("blocks", ["samples", "heads"])
@pytest.mark.parametrize("keep", [True, False])
def test_bfloat16_values_and_gradients(mask_kind, blocks, keep, monkeypatch):
    """bfloat16 attention in blocks of samples (or of one sample's heads when its scores exceed a block),
    probabilities kept or recomputed for the backward: as close to float64 as the peers' bfloat16 math."""
    if blocks == "heads":
        monkeypatch.setattr(oa, "_BLOCK_SCORES", 1 << 14)  # blocks of 2 heads and of 1
    if not keep:
        monkeypatch.setattr(oa, "KEEP_SCORES", 0)
    g = torch.Generator().manual_seed(9)
    b, h, m, n, d, e = 5, 3, 64, 96, 32, 48
    q, k, v = _heads(b, h, m, d, g), _heads(b, h, n, d, g), _heads(b, h, n, e, g)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(b, h if mask_kind == "per-head" else 1, 1, n, generator=g) > 0.3
    grad = torch.randn(b, h, m, e, generator=g)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    assert oa.applies(qb, kb, vb, mask, 0.0)
    out = oa.attend(qb, kb, vb, mask, scale=0.3)
    assert "OneDNNAttention" in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16
    saved = len(out.grad_fn.saved_tensors)
    assert saved > 4 if keep else saved == 4  # q, k, v, bias (+ the kept probabilities)
    out.backward(grad.bfloat16())
    refs = _reference(q, k, v, mask, 0.3, grad)
    for got, ref, peer in zip((out, qb.grad, kb.grad, vb.grad), refs, _reference(q, k, v, mask, 0.3, grad, torch.bfloat16)):
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        assert _relative_error(got, ref) <= 1.5 * _relative_error(peer, ref) + 2e-3
    spans = [i[0].stop - i[0].start if blocks == "samples" else i[1].stop - i[1].start for i in oa._blocks(qb, kb)]
    assert spans == ([5] if blocks == "samples" else [2, 1] * b)


@pytest.mark.usefixtures("onednn_on")
@pytest.mark.parametrize("amx", [False, True])
def test_bfloat16_inference_on_amx_goes_to_sdpa(amx, monkeypatch):
    """On processors with AMX, SDPA's fused bfloat16 forward is faster than the blocked products: bfloat16 heads
    of equal widths without autograd go there; in training (and with unequal widths) the blocked products stay."""
    from perceivers import kernels

    monkeypatch.setattr(kernels, "has_amx", lambda: amx)
    monkeypatch.setattr(oa, "_kernels_usable", lambda *tensors, bf16=False: True)
    q, k, v = (torch.randn(2, 4, 64, 32, dtype=torch.bfloat16) for _ in range(3))
    assert oa.applies(q, k, v, None, 0.0) is not amx
    assert oa.applies(q, k, torch.randn(2, 4, 64, 48, dtype=torch.bfloat16), None, 0.0)
    assert oa.applies(q.requires_grad_(), k, v, None, 0.0)


@pytest.mark.parametrize("mask_kind", [None, "keys"])
def test_bfloat16_training_on_amx_is_written_out(mask_kind, monkeypatch):
    """On processors with AMX, bfloat16 heads with autograd of at most ``KEEP_SCORES`` scores are attended as
    their products and softmax, which autograd differentiates (no blocked-products node), as close to float64 as
    the peers' bfloat16 math; larger calls, and calls without autograd or AMX, are not."""
    from perceivers import kernels
    from perceivers.layers import attention

    monkeypatch.setattr(kernels, "has_amx", lambda: True)
    g = torch.Generator().manual_seed(12)
    b, h, m, n, d = 2, 4, 64, 160, 32
    q, k, v = _heads(b, h, m, d, g), _heads(b, h, n, d, g), _heads(b, h, n, d, g)
    mask = None if mask_kind is None else torch.rand(b, 1, 1, n, generator=g) > 0.3
    grad = torch.randn(b, h, m, d, generator=g)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    assert attention._written_out_on_amx(qb, kb, vb, mask)
    assert not attention._written_out_on_amx(qb.detach(), kb.detach(), vb.detach(), mask)
    assert not attention._written_out_on_amx(q.requires_grad_(), k, v, mask)  # float32
    monkeypatch.setattr(kernels, "has_amx", lambda: False)
    assert not attention._written_out_on_amx(qb, kb, vb, mask)
    monkeypatch.setattr(kernels, "has_amx", lambda: True)
    out = attention.attend_heads(qb, kb, vb, mask, 0.0, scale=0.3)
    assert "OneDNN" not in type(out.grad_fn).__name__ and out.dtype == torch.bfloat16
    out.backward(grad.bfloat16())
    refs = _reference(q, k, v, mask, 0.3, grad)
    for got, ref, peer in zip((out, qb.grad, kb.grad, vb.grad), refs, _reference(q, k, v, mask, 0.3, grad, torch.bfloat16)):
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        assert _relative_error(got, ref) <= 1.5 * _relative_error(peer, ref) + 2e-3
    monkeypatch.setattr(oa, "KEEP_SCORES", b * h * m * n - 1)
    assert not attention._written_out_on_amx(qb, kb, vb, mask)


def test_bfloat16_autocast_attention_layer(monkeypatch):
    """Under CPU bfloat16 autocast an attention layer (projected or folded) runs here, not through SDPA,
    and agrees with the float32 layer to bfloat16 precision; its gradients reach every parameter. (As without
    AMX, where training is written out, above.)"""
    from perceivers.layers import attention

    monkeypatch.setattr(attention, "_written_out_on_amx", lambda *args: False)
    torch.manual_seed(10)
    for layer, x, context in (
        (Attention(q_dim=128, num_heads=4), torch.randn(2, 64, 128), None),
        (Attention(q_dim=128, kv_dim=29, num_heads=1, qk_channels=64, v_channels=64), torch.randn(2, 64, 128),
         torch.randn(2, 1024, 29)),  # narrow context: attends in its own space
    ):
        ref = layer(x, context)
        calls = []
        real = oa.attend
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(oa, "attend", lambda *a, calls=calls, real=real, **kw: calls.append(1) or real(*a, **kw))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(x, context)
        assert calls and out.dtype == torch.bfloat16
        assert _relative_error(out, ref.double()) <= 3e-2
        out.float().square().mean().backward()
        assert all(p.grad is not None for p in layer.parameters())
