"""Attention whose products run on oneDNN, one head at a time, for wide heads on CPU in float32.

PyTorch's fused CPU attention (``F.scaled_dot_product_attention``) computes its blocks' products with
MKL, which runs AVX2 kernels on AMD processors (see :mod:`perceivers.layers.dense`). Where heads are
wide (``d_k + d_v ≥ 192``: DeepMind's configurations, e.g. 128 + 128 in the vision model's latent
self-attention, 32 + 160 in the language model's cross-attentions) the products dominate, and
computing them per head with oneDNN's AVX-512 kernels is 1.2-2.4x faster in training
(docs/performance.md, "Attention products on oneDNN"). Narrower heads stay on the fused kernel, whose
single pass over the scores wins there.

Per ``(batch, head)``: scores ``q kᵀ`` with the key mask as the product's bias (``-inf`` on masked keys),
softmax, then the weighted sum; the backward recomputes the probabilities (only ``q, k, v`` are saved,
as in flash attention) and runs its four products on oneDNN too. One score matrix exists at a time,
at most ``2**23`` elements (32 MiB); larger ones go to the fused kernel, which streams them.
Under ``torch.compile`` forward and backward are the operators ``perceivers::onednn_attention`` and
``perceivers::onednn_attention_backward``; ``torch.export`` sees SDPA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dense import _onednn, _onednn_usable

__all__ = ["applies", "attend"]

_MIN_HEAD_WIDTH = 192  # d_k + d_v
_MIN_SCORES = 1 << 17  # per head: below this the per-call overhead loses
_MAX_SCORES = 1 << 23  # per head: the score matrix held at once


def applies(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float) -> bool:
    """Whether :func:`attend` serves ``q [B, H, M, d_k]``, ``k [B, H, N, d_k]``, ``v [B, H, N, d_v]``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not _onednn_usable(q, k, v):
        return False
    m, n = q.shape[-2], k.shape[-2]
    return (
        dropout == 0.0
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and q.shape[-1] + v.shape[-1] >= _MIN_HEAD_WIDTH
        and _MIN_SCORES <= m * n <= _MAX_SCORES
        and (attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[-2] == 1))
    )


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale) v`` → ``[B, H, M, d_v]``; ``attn_mask`` is a boolean key mask (True = attend)
    broadcast to ``[B, H, 1, N]``; every row must keep a key. ``scale`` defaults to ``d_k^-½``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape[:2] + attn_mask.shape[3:], dtype=q.dtype)
        bias.masked_fill_(~attn_mask[:, :, 0], float("-inf"))  # [B|1, H|1, N]
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, bias, scale)
    return _OneDNNAttention.apply(q, k, v, bias, scale)


def _key_bias(bias: Tensor | None, b: int, h: int) -> Tensor | None:
    """The key bias ``[N]`` of head ``(b, h)`` from ``[B|1, H|1, N]``."""
    return None if bias is None else bias[b if bias.shape[0] > 1 else 0, h if bias.shape[1] > 1 else 0]


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    qs = q * scale
    batch, heads, m = q.shape[:3]
    out = q.new_empty(batch, m, heads, v.shape[-1]).permute(0, 2, 1, 3)  # the heads merge as a view later
    for b in range(batch):
        for h in range(heads):
            p = _probabilities(qs[b, h], k[b, h], _key_bias(bias, b, h))
            out[b, h] = _onednn(p, v[b, h].t(), None)
    return out


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
              needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    qs = q * scale
    # full size even where k, v are expanded views; None where no gradient is asked for (frozen parts)
    dq, dk, dv = (torch.empty_like(t) if need else None for t, need in zip((q, k, v), needs))
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qh, kh, vh, doh = qs[b, h], k[b, h], v[b, h], dout[b, h]
            p = _probabilities(qh, kh, _key_bias(bias, b, h))  # [M, N]
            if dv is not None:
                dv[b, h] = _onednn(p.t(), doh.t(), None)
            if dq is None and dk is None:
                continue
            ds = torch._softmax_backward_data(_onednn(doh, vh, None), p, -1, p.dtype)  # d loss / d scores
            if dq is not None:
                dq[b, h] = _onednn(ds, kh.t(), None)
            if dk is not None:
                dk[b, h] = _onednn(ds.t(), qh.t(), None)
    if dq is not None:
        dq.mul_(scale)
    return dq, dk, dv


class _OneDNNAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
        _attention_setup(ctx, (q, k, v, bias, scale), None)
        return _forward(q, k, v, bias, scale)

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same gradients from differentiable operations
            return (*_math_gradients(q, k, v, bias, ctx.scale, dout), None, None)
        return (*_backward(dout, q, k, v, bias, ctx.scale, ctx.needs_input_grad[:3]), None, None)


# Under ``torch.compile``: the same as operators (``torch.library``), kept whole in the compiled graphs
# (as the dense layers' products, see :mod:`.dense`). Gradients not asked for come back empty.


@torch.library.custom_op("perceivers::onednn_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    return _forward(q, k, v, bias, scale)


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


def _attention_setup(ctx, inputs: tuple, output: Tensor | None) -> None:
    """What both backwards need: only ``q, k, v`` and the key bias (the probabilities are recomputed)."""
    q, k, v, bias, scale = inputs
    ctx.save_for_backward(q, k, v, bias)
    ctx.scale = scale


def _attention_backward(ctx, dout: Tensor):
    q, k, v, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _attention_backward_op(dout, q, k, v, bias, ctx.scale, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _probabilities(q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
    """``softmax(q kᵀ + bias)`` for one head: ``[M, d]``, ``[N, d]``, ``[N]`` → ``[M, N]``."""
    return torch.softmax(_onednn(q, k, bias), -1)


def _math_gradients(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, dout: Tensor):
    """The backward of :class:`_OneDNNAttention` in batched, differentiable operations."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias[:, :, None, :]
    p = scores.softmax(-1)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, dv
