"""Trained attention over heads wider than CUDA's fused kernels take, as grouped matrix products.

Flash and cuDNN attention stop at 256 channels per head. Past that, SDPA takes its memory-efficient kernel,
which on an H100 ran the official vision model's cross-attention at 37 TFLOP/s. That attention is folded into
the input's own space: one 264-wide head, 512 queries × 50176 keys, batch 64. It took 42% of the compiled
training step.

Here the same attention runs as batched products (cuBLAS's tensor-core GEMMs) over groups of heads, with
softmax in float32 inside its kernel:

* the forward keeps only the inputs and the output;
* the backward recomputes each group's scores, as a fused kernel does;
* memory stays at a few copies of one group's scores (``GROUP_BYTES``).

Its products are those that PyTorch's FLOP formula counts for the fused kernels: two forward, and five
backward (scores, ``dP``, ``dV``, ``dQ``, ``dK``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sdpa import math_grads

__all__ = ["GROUP_BYTES", "MAX_FUSED_WIDTH", "applies", "attend"]

#: the widest head (channels) that CUDA's flash and cuDNN attention kernels take
MAX_FUSED_WIDTH = 256
#: the scores of one group of heads, in bytes (the forward holds two such tensors, the backward three)
GROUP_BYTES = 512 * 2**20


def applies(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float) -> bool:
    """Whether :func:`attend` serves ``q [B, H, M, d]``, ``k [B, H, N, d]``, ``v [B, H, N, d_v]``.

    It does on CUDA, for a head wider than :data:`MAX_FUSED_WIDTH`, unmasked, without dropout, when
    autograd records and one head's scores fit in a group. Inference keeps SDPA, whose memory does not
    grow with the keys.
    """
    return (
        _on_cuda(q)
        and attn_mask is None
        and not dropout
        and q.dim() == k.dim() == v.dim() == 4
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and max(q.shape[-1], v.shape[-1]) > MAX_FUSED_WIDTH
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
        and q.shape[-2] * k.shape[-2] * q.element_size() <= GROUP_BYTES
    )


def _on_cuda(t: Tensor) -> bool:
    return t.device.type == "cuda"


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, group_bytes: int = GROUP_BYTES) -> Tensor:
    """``softmax(q kᵀ · scale) v`` per head, ``[B, H, M, d]``, ``[B, H, N, d]``, ``[B, H, N, d_v]`` → ``[B, H, M, d_v]``.

    ``scale`` defaults to ``d^-½``. Under autocast the operands are cast to its dtype, as SDPA's are.
    """
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    elif not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    per_head = q.shape[-2] * k.shape[-2] * q.element_size()
    group = max(1, group_bytes // max(per_head, 1))
    return _GroupedAttention.apply(q, k, v, scale, group)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, *t.shape[-2:])


def _probabilities(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``softmax(q kᵀ · scale)`` of one group ``[G, M, d]``, ``[G, N, d]`` → ``[G, M, N]`` (in q's dtype)."""
    return torch.softmax(torch.bmm(q, k.transpose(1, 2)).mul_(scale), dim=-1)


class _GroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, group: int) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, vf = _flat(q), _flat(k), _flat(v)
            out = qf.new_empty(qf.shape[0], qf.shape[1], vf.shape[-1])
            for i in range(0, qf.shape[0], group):
                j = i + group
                out[i:j].copy_(torch.bmm(_probabilities(qf[i:j], kf[i:j], scale), vf[i:j]))
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.group = scale, group
        return out.view(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors
        scale, group = ctx.scale, ctx.group
        if torch.is_grad_enabled():  # create_graph=True: a graph that can be differentiated again
            return (*math_grads(q, k, v, grad, {"scale": scale}), None, None)
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, vf, go = _flat(q), _flat(k), _flat(v), _flat(grad.to(v.dtype))
            dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
            for i in range(0, qf.shape[0], group):
                j = i + group
                p = _probabilities(qf[i:j], kf[i:j], scale)
                dv[i:j].copy_(torch.bmm(p.transpose(1, 2), go[i:j]))
                dp = torch.bmm(go[i:j], vf[i:j].transpose(1, 2))
                ds = torch._softmax_backward_data(dp, p, -1, p.dtype).mul_(scale)
                del dp, p
                dq[i:j].copy_(torch.bmm(ds, kf[i:j]))
                dk[i:j].copy_(torch.bmm(ds.transpose(1, 2), qf[i:j]))
        return dq.view_as(q), dk.view_as(k), dv.view_as(v), None, None

