"""Attention whose products run on oneDNN, for wide float32 heads and for bfloat16 on CPU.

PyTorch's fused CPU attention (``F.scaled_dot_product_attention``) computes its blocks' products with
MKL, which runs AVX2 kernels on AMD processors (see :mod:`perceivers.layers.dense`), and in bfloat16 it
computes in float32 internally: it runs no faster than in float32 (the README Perceiver's latent
self-attention, ``[8, 8, 256, 64]``: 7.5 ms in bfloat16, 7.0 ms in float32). Two cases go around it:

* **float32, wide heads** (``d_k + d_v ≥ 192``: DeepMind's configurations, e.g. 128 + 128 in the vision
  model's latent self-attention, 32 + 160 in the language model's cross-attentions): the products
  dominate, and computing them per head with oneDNN's AVX-512 kernels is 1.2-2.4x faster in training
  (docs/performance.md, "Attention products on oneDNN"). Narrower heads stay on the fused kernel, whose
  single pass over the scores wins there.
* **bfloat16** (autocast): the products run as batched bfloat16 matrix products (oneDNN), a block of
  samples (or of one sample's heads) at a time, each block's scores at most ``2**21`` elements (4 MiB):
  2.3-4x faster forward, 1.2-2.6x in training. Scores and probabilities are bfloat16, as in the peers
  and PyTorch's math attention; the products accumulate in float32.

Per block: scores ``q kᵀ`` with the key mask as the product's bias (``-inf`` on masked keys), softmax,
then the weighted sum. The backward recomputes the probabilities (only ``q, k, v`` are saved, as in flash
attention) and runs its four products the same way; in bfloat16 a call's probabilities are kept instead
when they are at most ``2**23`` (16 MiB), as the recomputation would cost more than they weigh. One
head's score matrix holds at most ``2**23`` elements; larger ones go to the fused kernel, which streams
them.
Under ``torch.compile`` the float32 forward and backward are the operators ``perceivers::onednn_attention``
and ``perceivers::onednn_attention_backward`` (bfloat16 stays on SDPA there); ``torch.export`` sees SDPA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .dense import _kernels_usable, _onednn, _onednn_usable, _records_graph

__all__ = ["applies", "attend"]

_MIN_HEAD_WIDTH = 192  # d_k + d_v (float32)
_MIN_SCORES = 1 << 17  # per head (float32): below this the per-call overhead loses
_MAX_SCORES = 1 << 23  # per head: the score matrix held at once
_BLOCK_SCORES = 1 << 21  # bfloat16: the scores of one block of samples (4 MiB)
_KEEP_SCORES = 1 << 23  # bfloat16: a call's probabilities kept for the backward up to this many (16 MiB)


def applies(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float) -> bool:
    """Whether :func:`attend` serves ``q [B, H, M, d_k]``, ``k [B, H, N, d_k]``, ``v [B, H, N, d_v]``."""
    if not (
        q.dim() == k.dim() == v.dim() == 4
        and dropout == 0.0
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and q.shape[-2] * k.shape[-2] <= _MAX_SCORES
        and (attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[-2] == 1))
    ):
        return False
    if q.dtype == torch.bfloat16:
        return k.dtype == v.dtype == q.dtype and not torch.compiler.is_compiling() and _kernels_usable(q, k, v)
    return (
        q.shape[-1] + v.shape[-1] >= _MIN_HEAD_WIDTH
        and q.shape[-2] * k.shape[-2] >= _MIN_SCORES
        and _onednn_usable(q, k, v)
    )


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale) v`` → ``[B, H, M, d_v]``; ``attn_mask`` is a boolean key mask (True = attend)
    broadcast to ``[B, H, 1, N]``; every row must keep a key. ``scale`` defaults to ``d_k^-½``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype)
        bias.masked_fill_(~attn_mask, float("-inf"))  # [B|1, H|1, 1, N]
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, bias, scale)
    if not _records_graph(q, k, v):
        return _forward(q, k, v, bias, scale)[0]
    keep = q.dtype == torch.bfloat16 and q.shape[:3].numel() * k.shape[-2] <= _KEEP_SCORES
    return _OneDNNAttention.apply(q, k, v, bias, scale, keep)


def _blocks(q: Tensor, k: Tensor) -> tuple[list[tuple], Callable]:
    """Where the work is split and which product serves it: indices into ``q, k, v`` (and the output),
    one ``(b, h)`` head at a time in float32 (oneDNN's 2-D products); in bfloat16 blocks whose scores fit
    :data:`_BLOCK_SCORES`: of samples ``(slice,)``, or of one sample's heads ``(b, slice)``."""
    batch, heads, m = q.shape[:3]
    if q.dtype == torch.float32:
        return [(b, h) for b in range(batch) for h in range(heads)], _onednn
    per_head = m * k.shape[-2]
    if heads * per_head <= _BLOCK_SCORES:
        step = _BLOCK_SCORES // (heads * per_head)
        return [(slice(b, min(b + step, batch)),) for b in range(0, batch, step)], _matmul_t
    step = max(1, _BLOCK_SCORES // per_head)
    return [(b, slice(h, min(h + step, heads))) for b in range(batch) for h in range(0, heads, step)], _matmul_t


def _matmul_t(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """``a bᵀ + bias`` over leading batch axes (the batched counterpart of ``_onednn``)."""
    a3, b3 = _flat(a), _flat(b)
    # one matrix: mm, as matmul and bmm copy a transposed operand when the batch holds one entry
    flat = torch.mm(a3[0], b3[0].t()) if a3.shape[0] == 1 else torch.bmm(a3, b3.transpose(-1, -2))
    out = flat.view(*a.shape[:-1], b.shape[-2])
    return out if bias is None else out.add_(bias)


def _flat(t: Tensor) -> Tensor:
    """``t [..., r, c]`` as ``[G, r, c]``; where that takes a copy, a transposed matrix is copied in its own
    layout (a plain copy, where copying it across its strides is a gather: 5x slower)."""
    if t.stride(-1) != 1 and t.stride(-2) == 1:
        return t.transpose(-1, -2).reshape(-1, t.shape[-1], t.shape[-2]).transpose(-1, -2)
    return t.reshape(-1, *t.shape[-2:])


def _key_bias(bias: Tensor | None, index: tuple) -> Tensor | None:
    """The key bias of block ``index`` from ``[B|1, H|1, 1, N]`` (broadcast axes taken whole): ``[N]`` for
    one head ``(b, h)``, else with the block's leading axes."""
    if bias is None:
        return None
    picked = bias[tuple(i if bias.shape[axis] > 1 else (0 if isinstance(i, int) else slice(0, 1))
                        for axis, i in enumerate(index))]
    return picked[0] if all(isinstance(i, int) for i in index) else picked


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
             keep: bool = False) -> tuple[Tensor, list[Tensor]]:
    """The output and, with ``keep``, each block's probabilities (for the backward)."""
    qs = q * scale
    kept = []
    batch, heads, m = q.shape[:3]
    out = q.new_empty(batch, m, heads, v.shape[-1]).permute(0, 2, 1, 3)  # the heads merge as a view later
    blocks, product = _blocks(q, k)
    with torch.autocast("cpu", enabled=False):
        for i in blocks:
            p = torch.softmax(product(qs[i], k[i], _key_bias(bias, i)), -1)
            out[i] = product(p, v[i].transpose(-1, -2), None)
            if keep:
                kept.append(p)
    return out, kept


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
              needs: tuple[bool, bool, bool], kept: Sequence[Tensor] = ()) -> tuple[Tensor | None, ...]:
    """``dq, dk, dv`` (``None`` where not needed); the probabilities are recomputed unless ``kept``."""
    qs = q * scale
    # full size even where k, v are expanded views; None where no gradient is asked for (frozen parts)
    dq, dk, dv = (torch.empty_like(t) if need else None for t, need in zip((q, k, v), needs))
    blocks, product = _blocks(q, k)
    with torch.autocast("cpu", enabled=False):
        for j, i in enumerate(blocks):
            qh, kh, vh, doh = qs[i], k[i], v[i], dout[i]
            p = kept[j] if kept else torch.softmax(product(qh, kh, _key_bias(bias, i)), -1)  # [.., M, N]
            if dv is not None:
                dv[i] = product(p.transpose(-1, -2), doh.transpose(-1, -2), None)
            if dq is None and dk is None:
                continue
            ds = torch._softmax_backward_data(product(doh, vh, None), p, -1, p.dtype)  # d loss / d scores
            if dq is not None:
                dq[i] = product(ds, kh.transpose(-1, -2), None)
            if dk is not None:
                dk[i] = product(ds.transpose(-1, -2), qh.transpose(-1, -2), None)
    if dq is not None:
        dq.mul_(scale)
    return dq, dk, dv


class _OneDNNAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, keep: bool) -> Tensor:
        out, kept = _forward(q, k, v, bias, scale, keep)
        _save(ctx, q, k, v, bias, scale, kept)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, bias, *kept = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same gradients from differentiable operations
            return (*_math_gradients(q, k, v, bias, ctx.scale, dout), None, None, None)
        return (*_backward(dout, q, k, v, bias, ctx.scale, ctx.needs_input_grad[:3], kept), None, None, None)


# Under ``torch.compile``: the same as operators (``torch.library``), kept whole in the compiled graphs
# (as the dense layers' products, see :mod:`.dense`). Gradients not asked for come back empty.


@torch.library.custom_op("perceivers::onednn_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    return _forward(q, k, v, bias, scale)[0]


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).permute(0, 2, 1, 3)


@torch.library.custom_op("perceivers::onednn_attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                           need_q: bool, need_k: bool, need_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward(dout, q, k, v, bias, scale, (need_q, need_k, need_v))
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@_attention_backward_op.register_fake
def _(dout, q, k, v, bias, scale, need_q, need_k, need_v):
    return tuple(torch.empty_like(t) if need else q.new_empty(0) for t, need in zip((q, k, v), (need_q, need_k, need_v)))


def _save(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, kept: Sequence[Tensor] = ()) -> None:
    """What both backwards need: ``q, k, v``, the key bias and any kept probabilities (else recomputed)."""
    ctx.save_for_backward(q, k, v, bias, *kept)
    ctx.scale = scale


def _attention_setup(ctx, inputs: tuple, output: Tensor | None) -> None:
    _save(ctx, *inputs)


def _attention_backward(ctx, dout: Tensor):
    q, k, v, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _attention_backward_op(dout, q, k, v, bias, ctx.scale, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _math_gradients(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, dout: Tensor):
    """The backward of :class:`_OneDNNAttention` in batched, differentiable operations."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    p = scores.softmax(-1)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, dv
