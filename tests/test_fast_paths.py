"""The performance paths compute the same function as the plain one (docs/performance.md).

Attending in the context's own space (``Attention.fold_kv``), streaming the context in chunks
(``forward_chunked``, ``ContextStream``, ``Perceiver(chunk_size=...)``), per-chunk Fourier features
(``FourierPositionEncoding.grid_rows``) and chunked decoding must match the direct computation to
float32 rounding, in values and gradients, with masks; and no attention matrix is materialised.
"""

from __future__ import annotations

import math

import pytest
import torch
from memory_probe import LargestFloatOutput

import perceivers
from perceivers.layers import (
    Attention,
    ContextStream,
    CrossAttentionBlock,
    FourierPositionEncoding,
    auto_chunk_size,
)
from perceivers.validation import finite_checks

TOL = {"atol": 2e-5, "rtol": 1e-4}


def _set_fold(module: torch.nn.Module, value: bool | None) -> None:
    for m in module.modules():
        if isinstance(m, Attention):
            m.fold_kv = value


def _small_perceiver(**kw) -> perceivers.Perceiver:
    torch.manual_seed(0)
    cfg = {"num_freq_bands": 4, "depth": 2, "max_freq": 10.0, "input_channels": 3, "input_axis": 2, "num_latents": 8,
               "latent_dim": 32, "cross_heads": 1, "latent_heads": 2, "cross_dim_head": 32, "latent_dim_head": 16, "num_classes": 5,
               "self_per_cross_attn": 1}
    cfg.update(kw)
    return perceivers.Perceiver(**cfg)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("heads", [1, 2])
def test_fold_matches_projection(bias: bool, heads: int) -> None:
    torch.manual_seed(0)
    attn = Attention(24, 5, num_heads=heads, qk_channels=32 * heads, v_channels=16 * heads, qkv_bias=bias)
    assert attn.folds()
    x, ctx = torch.randn(3, 6, 24), torch.randn(3, 40, 5)
    mask = torch.rand(3, 40) > 0.4
    mask[1] = False  # a sample with nothing to attend: zeros, not NaN
    for m in (None, mask):
        attn.fold_kv = False
        ref = attn(x, ctx, mask=m)
        attn.fold_kv = None
        out = attn(x, ctx, mask=m)
        torch.testing.assert_close(out, ref, **TOL)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("heads, q_dim, kv_dim, width, queries", [
    (2, 16, 6, 64, 5),
    (1, 16, 6, 64, 5),
    (1, 512, 384, 512, 128),  # one head: fold and unfold as dense products over every row, large enough for oneDNN
])
def test_fold_gradients_match(heads, q_dim, kv_dim, width, queries) -> None:
    torch.manual_seed(0)
    attn = Attention(q_dim, kv_dim, num_heads=heads, qk_channels=width, v_channels=width)
    x = torch.randn(2, queries, q_dim, requires_grad=True)
    ctx = torch.randn(2, 30, kv_dim, requires_grad=True)
    grads = []
    for fold in (False, True):
        attn.fold_kv = fold
        attn.zero_grad()
        x.grad = ctx.grad = None
        attn(x, ctx).square().sum().backward()
        # the key bias cancels in the softmax: its gradient is 0 (exactly, when folded)
        grads.append([x.grad.clone(), ctx.grad.clone()]
                     + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in attn.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_fold_is_chosen_only_when_cheaper() -> None:
    assert Attention(512, 29, num_heads=1, qk_channels=64).folds()  # README Perceiver: 29 channels vs 64 + 64
    assert not Attention(512, 261, num_heads=1, qk_channels=261).folds()  # DeepMind Fourier vision
    assert not Attention(512, 29, num_heads=1, qk_channels=64).folds(inverted=True)


@pytest.mark.parametrize("v_channels", [None, 96])  # value heads as wide as the keys, or wider (language models)
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_whole(fold: bool, masked: bool, v_channels: int | None) -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(32, 7, num_heads=2, qk_channels=64, v_channels=v_channels, qkv_bias=True)
    block.attn.fold_kv = fold
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 101, 7)
    mask = None
    if masked:
        mask = torch.rand(2, 101) > 0.5
        mask[0, :50] = False  # whole chunks without a valid key
        mask[1] = False
    ref = block(x, ctx, mask=mask)
    for size in (10, 64, 101):
        with torch.no_grad():
            out = block(x, kv=ContextStream.from_tensor(ctx, size), mask=mask)
        torch.testing.assert_close(out, ref.detach(), **TOL)


@pytest.mark.parametrize("fold", [False, True])
def test_chunked_bfloat16_inference_takes_the_online_softmax(fold: bool, monkeypatch) -> None:
    """Under bfloat16 autocast the stream merges bfloat16 products with the online softmax (the fused
    kernel computes bfloat16 in float32, slower) and agrees with the whole forward to bfloat16 precision."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(32, 7, num_heads=2, qk_channels=64, qkv_bias=True)
    block.attn.fold_kv = fold
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 101, 7)
    ref = block(x, ctx).detach()
    fused = []
    real = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda *a, **kw: fused.append(1) or real(*a, **kw))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, kv=ContextStream.from_tensor(ctx, 16))
    assert fused == []
    assert (out.float() - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_chunked_gradients_match() -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 7, num_heads=1, qk_channels=32)
    x = torch.randn(2, 4, 16, requires_grad=True)
    ctx = torch.randn(2, 50, 7, requires_grad=True)
    results = []
    for stream in (False, True):
        block.zero_grad()
        x.grad = ctx.grad = None
        out = block(x, kv=ContextStream.from_tensor(ctx, 16)) if stream else block(x, ctx)
        out.square().sum().backward()
        results.append([out.detach(), x.grad.clone(), ctx.grad.clone()]
                       + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in block.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("layout", ["lucidrains", "deepmind"])
@pytest.mark.parametrize("shape", [(11,), (6, 9), (3, 4, 5)])
def test_grid_rows_match_forward(layout: str, shape: tuple[int, ...]) -> None:
    enc = FourierPositionEncoding(len(shape), 5, [9.0, 7.0, 5.0][: len(shape)], layout=layout)
    full = enc(shape)
    m = math.prod(shape)
    for a, b in ((0, m), (2, m - 3), (m // 2, m)):
        torch.testing.assert_close(enc.grid_rows(shape, a, b), full[a:b], atol=1e-6, rtol=0)


def test_perceiver_streaming_matches() -> None:
    model = _small_perceiver(weight_tie_layers=True, depth=3).eval()
    x = torch.randn(2, 20, 24, 3)
    mask = torch.rand(2, 20, 24) > 0.3
    with torch.no_grad():
        model.chunk_size = 0
        ref, ref_m = model(x), model(x, mask=mask)
        model.chunk_size = 100
        assert model.context_stream(x) is not None
        torch.testing.assert_close(model(x), ref, **TOL)
        torch.testing.assert_close(model(x, mask=mask), ref_m, **TOL)
        _set_fold(model, False)
        torch.testing.assert_close(model(x), ref, **TOL)


def test_perceiver_streaming_with_positions_and_gradients() -> None:
    model = _small_perceiver()
    data, pos = torch.randn(2, 300, 3), torch.rand(2, 300, 2) * 2 - 1
    out = []
    for size in (0, 64):
        model.chunk_size = size
        model.zero_grad()
        y = model(data, pos=pos)
        y.square().sum().backward()
        out.append([y.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                   for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, **TOL)


def test_perceiver_io_chunked_encode_and_decode() -> None:
    torch.manual_seed(0)
    model = perceivers.PerceiverIO(dim=8, queries_dim=12, logits_dim=5, depth=1, num_latents=6, latent_dim=16,
                                   decoder_ff=True).eval()
    data, queries = torch.randn(2, 500, 8), torch.randn(300, 12)
    mask = torch.rand(2, 500) > 0.5
    with torch.no_grad():
        model.chunk_size = model.decode_chunk_size = 0
        ref = model(data, mask=mask, queries=queries)
        model.chunk_size, model.decode_chunk_size = 128, 64
        torch.testing.assert_close(model(data, mask=mask, queries=queries), ref, **TOL)


def test_auto_chunk_size_policy() -> None:
    assert auto_chunk_size(1000, None) == 0
    assert auto_chunk_size(65536, None) == 32768  # inference: a quarter of the input, 32768 to 65536
    assert auto_chunk_size(32768, None) == 0
    assert auto_chunk_size(10**6, None) == 65536
    assert auto_chunk_size(65536, None, grad=True) == 0  # autograd: only above 65536
    assert auto_chunk_size(10**6, None, grad=True) == 65536
    assert auto_chunk_size(1000, 0) == 0
    assert auto_chunk_size(1000, 100) == 100
    assert auto_chunk_size(50, 100) == 0
    with pytest.raises(ValueError, match="chunk_size"):
        auto_chunk_size(10, -1)
    # wide inputs: chunks of at most 2**21 values per chunk on the CPU (its cache), 2**25 on a GPU (its memory)
    assert auto_chunk_size(50176, None, channels=261, batch=16) == 512
    assert auto_chunk_size(50176, None, channels=261, batch=16, device=torch.device("cpu")) == 512
    assert auto_chunk_size(50176, None, channels=261, batch=16, device=torch.device("cuda")) == 2**25 // (16 * 261)
    assert auto_chunk_size(10**6, None, channels=261, device=torch.device("cuda")) == 65536


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), ("8", TypeError), (2.5, TypeError), (True, TypeError)])
def test_chunk_sizes_are_checked_when_the_model_is_built(value, error) -> None:
    """A negative, string, float or bool chunk size is refused by the constructor, naming the argument (it was taken
    and failed at the first forward, or inside ``range``); set later, the forward refuses it the same way."""
    with pytest.raises(error, match=r"^chunk_size must be None, 0 or a positive int, got"):
        _small_perceiver(chunk_size=value)
    io = {"dim": 8, "queries_dim": 6, "depth": 1, "num_latents": 4, "latent_dim": 16}
    with pytest.raises(error, match=r"^decode_chunk_size must be None, 0 or a positive int"):
        perceivers.PerceiverIO(**io, decode_chunk_size=value)
    with pytest.raises(error, match=r"^chunk_size must be"):
        perceivers.PerceiverIO(**io, chunk_size=value)
    model = _small_perceiver()
    model.chunk_size = value
    with pytest.raises(error, match=r"^chunk_size must be"):
        model(torch.randn(1, 6, 7, 3))


def test_no_attention_matrix_is_materialised() -> None:
    model = _small_perceiver(num_latents=64).eval()
    x = torch.randn(1, 64, 64, 3)  # 4096 inputs; scores would be 64 × 4096 per head
    model.chunk_size = 0
    with torch.no_grad(), LargestFloatOutput() as probe:
        model(x)
    assert probe.largest < 64 * 4096


def test_streaming_memory_does_not_grow_with_the_input() -> None:
    model = _small_perceiver().eval()
    model.chunk_size = 512
    x = torch.randn(1, 128, 128, 3)  # 16384 inputs
    # (the NaN/Inf input check makes one input-sized temporary: not what this test is about)
    with torch.no_grad(), finite_checks(False), LargestFloatOutput() as probe:
        model(x)
    # nothing of the input's length exists besides the input itself: chunks of 512 rows at most
    assert probe.largest <= 512 * 64


def test_cross_attention_block_streams_long_contexts_by_itself() -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(16, 300, num_heads=2, qk_channels=32).eval()  # wide context: no fold
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 40_000, 300)
    with torch.no_grad():
        block.chunk_size = 0
        ref = block(x, ctx)
        block.chunk_size = None  # auto: above 32768 elements, without autograd
        assert block._stream_size(ctx, False) > 0
        torch.testing.assert_close(block(x, ctx), ref, **TOL)
    assert block._stream_size(ctx, False) == 0  # autograd on: the whole context, unless chunk_size > 0
    block.chunk_size = 5_000
    assert block._stream_size(ctx, False) == 5_000


def test_chunked_attention_with_autograd_bounds_the_scores_per_step() -> None:
    """The online-softmax loop (taken with autograd) attends a chunk in steps of at most 2**23 scores: a chunk of
    8192 keys for 2 × 2 × 1024 queries made score tensors of 2**25 elements (the README Perceiver's masked
    training at 512² peaked at 0.49 GiB, 0.65 GiB at 1024²)."""
    torch.manual_seed(0)
    attn = Attention(16, 24, num_heads=2, qk_channels=32)
    x, ctx = torch.randn(2, 1024, 16, requires_grad=True), torch.randn(2, 8192, 24)
    mask = torch.rand(2, 8192) > 0.1
    with finite_checks(False), LargestFloatOutput() as probe:
        out = attn.forward_chunked(x, lambda a, b: ctx[:, a:b], 8192, chunk_size=8192, mask=mask)
        out.sum().backward()
    assert probe.largest <= 1 << 23
    grad, x.grad = x.grad, None
    ref = attn(x, ctx, mask=mask)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(grad, x.grad, **TOL)
