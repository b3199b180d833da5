"""The fold cost model (``Attention.fold_kv=None``): when attending in the input's own space is chosen,
and that every path that may now fold (masks, query masks, training, prepared contexts, streaming)
computes the same function as the projected one."""

from __future__ import annotations

import pytest
import torch

from perceivers.layers import Attention, ContextStream, CrossAttentionBlock, fold_is_cheaper
from perceivers.validation import finite_checks

TOL = {"atol": 2e-5, "rtol": 1e-4}


def test_cost_model_on_the_published_shapes() -> None:
    # README Perceiver: 29 input channels, 64 + 64 per head, 256 latents: fold.
    assert fold_is_cheaper(29, 128, 256, 50_176)
    # DeepMind Fourier vision encoder: 261 channels, one 261 + 261 head. Reduced (128 latents) and
    # official (512 latents) both fold; the model's cost drops ≈3× and ≈1.5×.
    for n, gain in ((128, 3.0), (512, 1.5)):
        assert fold_is_cheaper(261, 522, n, 50_176)
        assert (261 + n) * 522 / (2 * n * 264) == pytest.approx(gain, rel=0.05)
    # The per-head rule alone (many queries) does not fold it: the old decision.
    assert not fold_is_cheaper(261, 522)
    # Language model: encoder (768 channels, 8 heads of 32 + 160, 256 latents) and decoder (2048
    # queries against 256 latents of 1280 channels, 8 heads of 32 + 96) stay projected.
    assert not fold_is_cheaper(768, 192, 256, 2048)
    assert not fold_is_cheaper(1280, 128, 2048, 256)
    # One classification query against the latents: mapping one query beats projecting every latent.
    assert fold_is_cheaper(1024, 2048, 1, 512)
    # Self-attention (as many queries as keys) reduces to the per-head rule 2·C' < d_k + d_v.
    for c, w, n in ((512, 128, 8), (16, 64, 300), (40, 64, 7)):
        assert fold_is_cheaper(c, w, n, n) == (2 * (c + -c % 8) < w)


def test_folds_uses_the_numbers_of_queries_and_keys() -> None:
    attn = Attention(256, 261, qk_channels=261)
    assert attn.folds(num_queries=128, length=4096)
    assert not attn.folds()  # "many queries": the per-head rule
    assert not attn.folds(inverted=True, num_queries=128, length=4096)
    attn.fold_kv = False
    assert not attn.folds(num_queries=128, length=4096)
    attn.fold_kv = True
    assert attn.folds()


def _pair(fold_auto: Attention, fn):
    fold_auto.fold_kv = False
    ref = fn()
    fold_auto.fold_kv = None
    return ref, fn()


@pytest.mark.parametrize("heads", [1, 3])
def test_auto_fold_matches_projection_with_masks_and_gradients(heads: int) -> None:
    torch.manual_seed(0)
    attn = Attention(48, 21, num_heads=heads, qk_channels=21 * heads, v_channels=21 * heads)
    x = torch.randn(2, 5, 48, requires_grad=True)
    ctx = torch.randn(2, 70, 21, requires_grad=True)
    assert attn.folds(num_queries=5, length=70) and not attn.folds()
    mask = torch.rand(2, 70) > 0.3
    mask[1] = False  # nothing to attend: zeros
    query_mask = torch.tensor([[True, False, True, True, False], [True] * 5])

    def run():
        attn.zero_grad()
        x.grad = ctx.grad = None
        out = attn(x, ctx, mask=mask, query_mask=query_mask)
        out.square().sum().backward()
        return [out.detach(), x.grad.clone(), ctx.grad.clone()] + [p.grad.clone() for p in attn.parameters()]

    ref, out = _pair(attn, run)
    for name, a, b in zip(["out", "x", "ctx"] + [n for n, _ in attn.named_parameters()], ref, out):
        torch.testing.assert_close(b, a, **TOL, msg=name)
    # the key bias cancels in the softmax: folded, its gradient is exactly 0 (and present, for DDP)
    assert not out[3 + [n for n, _ in attn.named_parameters()].index("to_k.bias")].any()


def test_inverted_attention_and_projected_kv_never_fold() -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(32, 6, num_heads=1, qk_channels=64)
    x, ctx = torch.randn(2, 4, 32), torch.randn(2, 30, 6)
    assert block.attn.folds(num_queries=4, length=30)
    assert isinstance(block.prepare(ctx, num_queries=4), torch.Tensor)  # the normalised context
    assert isinstance(block.prepare(ctx, inverted=True, num_queries=4), tuple)  # keys and values
    k, v = block.project_kv(ctx)
    with torch.no_grad():
        ref = block(x, ctx)
        torch.testing.assert_close(block(x, kv=(k, v)), ref, **TOL)
        torch.testing.assert_close(block(x, kv=block.prepare(ctx, num_queries=4)), ref, **TOL)
        block.attn.fold_kv = False
        torch.testing.assert_close(block(x, ctx), ref, **TOL)
        torch.testing.assert_close(block(x, ctx, inverted=True), block(x, kv=(k, v), inverted=True), **TOL)


@pytest.mark.parametrize("grad", [False, True])
def test_streamed_auto_fold_matches(grad: bool) -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(40, 19, num_heads=1, qk_channels=19)  # DeepMind-shaped: one head as wide as C
    assert block.attn.folds(num_queries=6, length=300) and not block.attn.folds()
    x, ctx = torch.randn(2, 6, 40), torch.randn(2, 300, 19)
    mask = torch.rand(2, 300) > 0.4
    with torch.set_grad_enabled(grad), finite_checks(False):
        block.attn.fold_kv = False
        ref = block(x, ctx, mask=mask)
        block.attn.fold_kv = None
        out = block(x, kv=ContextStream.from_tensor(ctx, 64), mask=mask)
    torch.testing.assert_close(out, ref, **TOL)
    if grad:
        g_ref = torch.autograd.grad(ref.square().sum(), list(block.parameters()), allow_unused=True)
        g_out = torch.autograd.grad(out.square().sum(), list(block.parameters()), allow_unused=True)
        for a, b in zip(g_ref, g_out):
            torch.testing.assert_close(b, a, **TOL)


def test_attention_dropout_in_training_never_folds() -> None:
    """Dropped weights do not sum to 1, so folding would add ``b_v`` whole where the values' share of it was
    dropped: while dropout is active the values are projected, also when streaming or forced by
    ``fold_kv=True``. At p = 1 every attention output is then the output bias (as in transformers)."""
    torch.manual_seed(0)
    block = CrossAttentionBlock(40, 19, num_heads=1, qk_channels=19, attn_dropout=1.0)
    x, ctx = torch.randn(2, 6, 40), torch.randn(2, 300, 19)
    for fold in (None, True):
        block.attn.fold_kv = fold
        assert block.attn.eval().folds(num_queries=6, length=300)
        assert not block.attn.train().folds(num_queries=6, length=300)
        with torch.no_grad():
            attended = block.attn(x, ctx)
            torch.testing.assert_close(attended, block.attn.to_out.bias.expand_as(attended), atol=0, rtol=0)
            whole = block.train()(x, ctx)
            with finite_checks(False):
                torch.testing.assert_close(block(x, kv=ContextStream.from_tensor(ctx, 64)), whole, **TOL)
