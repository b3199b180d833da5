"""``F.scaled_dot_product_attention``, twice differentiable.

PyTorch's fused attention kernels (the CPU flash kernel, CUDA's flash and memory-efficient ones) have no
derivative of their backward: ``torch.autograd.grad(..., create_graph=True)`` through them (gradient
penalties, meta-learning, ``gradgradcheck``) fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented", where attention written
out (perceiver-pytorch's einsums) works. :func:`sdpa` runs the same kernel forward and backward; only a
backward asked to build a graph recomputes the attention through SDPA's math path (differentiable
operators) and differentiates that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .dense import _func_transforms, _plain_eager

__all__ = ["sdpa"]


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0, *,
         is_causal: bool = False, scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` (same arguments and result), differentiable twice
    where it records a graph in eager mode. Dropout draws cannot be recomputed, a mask that requires grad
    has its own path, and compiled or exported graphs never differentiate twice: those call SDPA as it is;
    ``torch.func`` transforms and forward-mode AD get SDPA's math path."""
    options = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
    compiling = torch.compiler.is_compiling()
    if not compiling and _func_transforms():  # the math path's operators: they vmap and carry tangents
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **options)
    if (not torch.is_grad_enabled() or dropout_p or compiling or not _plain_eager()
            or not any(t.requires_grad for t in (q, k, v))
            or (attn_mask is not None and attn_mask.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, **options)
    return _TwiceDifferentiable.apply(q, k, v, attn_mask, is_causal, scale)


class _TwiceDifferentiable(torch.autograd.Function):
    """SDPA's own forward and backward, kept as an inner graph; a backward with ``create_graph=True``
    differentiates the math path's operators instead."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                scale: float | None) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.options = {"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale}
        ctx.inner = _inner_graph(q, k, v, ctx.options)
        return ctx.inner[0].detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        inner, ctx.inner = ctx.inner, None  # its saved tensors go now, not when the outer graph does
        if torch.is_grad_enabled():  # create_graph=True: a graph of differentiable operators
            return (*math_grads(q, k, v, grad, ctx.options, need), None, None, None)
        # the kernel's backward; a second backward (retain_graph=True) runs the forward again
        out, inputs = inner if inner is not None else _inner_graph(q, k, v, ctx.options)
        return (*_grads(out, inputs, grad, need, create_graph=False), None, None, None)


def math_grads(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, options: dict,
               need: tuple[bool, bool, bool] = (True, True, True)) -> tuple[Tensor | None, ...]:
    """The gradients of ``q, k, v`` (``None`` where not ``need``-ed) through SDPA's math path, as a graph of
    differentiable operators: a backward with ``create_graph=True`` that can itself be differentiated."""
    inputs = tuple(t.view_as(t) for t in (q, k, v))  # one each, also where k is v (attending in its space)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*inputs, **options)
    return _grads(out, inputs, grad, need, create_graph=True)


def _grads(out: Tensor, inputs: tuple[Tensor, ...], grad: Tensor, need: tuple[bool, ...],
           create_graph: bool) -> tuple[Tensor | None, ...]:
    wanted = [t for t, n in zip(inputs, need) if n]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=create_graph))
    return tuple(next(grads) if n else None for n in need)


def _inner_graph(q: Tensor, k: Tensor, v: Tensor, options: dict) -> tuple[Tensor, tuple[Tensor, ...]]:
    """SDPA of detached copies of ``q, k, v`` (the ones that required grad still do) with its graph:
    ``(out, (q, k, v))``."""
    inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
    with torch.enable_grad():
        return F.scaled_dot_product_attention(*inputs, **options), inputs
