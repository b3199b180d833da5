"""GEGLU (``a · gelu(g)`` over the halves ``[a, g]`` of the last axis) through a native kernel.

PyTorch computes it as a GELU, a product and, in the backward, a GELU derivative, two products and the
concatenation of the halves' gradients: six passes over memory (a quarter of the README Perceiver's
training step went there). The kernel (:mod:`perceivers.kernels`, ``activations.c``) does each direction
in one pass, the backward's GELU derivative sharing the forward's exponential, and saves only its input
(PyTorch's path also keeps ``gelu(g)``). The GELU is the exact one (``erf``), with its relative accuracy
kept far into the negative tail (``activations.c``).

It serves float32 and bfloat16 CPU tensors (bfloat16: widened as read, computed in float32 and rounded once
to bfloat16 as written; PyTorch's path rounds after the GELU and after the product) where perceivers' native
kernels run (:func:`.dense._native_eager`: eager, outside ``torch.compile``, tracing, ``torch.func``
transforms, forward-mode AD and dispatch modes), on x86 processors with AVX2 or AVX-512
(:func:`perceivers.kernels.has_avx2`), with ``PERCEIVERS_NATIVE`` not off; ``create_graph=True`` gets the same
gradients from differentiable operations.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from .. import kernels
from .dense import _native_eager

__all__ = ["applies", "available", "geglu"]

_SIGNATURES = {
    f"perceivers_geglu{kind}{part}": ([ctypes.c_int64] * 3 + [ctypes.c_void_p] * count, None)
    for kind in ("", "_bf16") for part, count in (("", 2), ("_backward", 3))
}
_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}


def _kernel():
    return kernels.load("activations", _SIGNATURES, isa="avx2")


def available() -> bool:
    """Whether the native kernel is built and enabled (``PERCEIVERS_NATIVE``), on a processor with AVX2."""
    return _kernel() is not None


def applies(h: Tensor) -> bool:
    """Whether :func:`geglu` serves ``h [..., 2n]``."""
    return (h.dim() >= 1 and h.shape[-1] % 2 == 0 and h.numel() > 0 and h.dtype in _SUFFIX
            and _native_eager(h, dtype=h.dtype) and available())


def geglu(h: Tensor) -> Tensor:
    """``a · gelu(g)`` for ``h = [a, g]``: ``[..., 2n]`` -> ``[..., n]`` (call where :func:`applies`)."""
    return _NativeGEGLU.apply(h)


def _rows(t: Tensor) -> Tensor:
    """``t`` as rows ``[R, C]`` with contiguous channels (a view where its strides allow)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _gelu_gradients(h: Tensor, dout: Tensor) -> Tensor:
    """The gradient for ``h`` from differentiable operations (``create_graph=True``)."""
    value, gate = h.chunk(2, dim=-1)
    cdf = 0.5 * (1.0 + torch.erf(gate * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * gate * gate) / math.sqrt(2.0 * math.pi)
    return torch.cat([dout * gate * cdf, dout * value * (cdf + gate * pdf)], dim=-1)


class _NativeGEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        rows = _rows(h)
        n = rows.shape[1] // 2
        out = h.new_empty(*h.shape[:-1], n)
        forward = getattr(_kernel(), f"perceivers_geglu{_SUFFIX[h.dtype]}")
        forward(rows.shape[0], n, rows.stride(0), rows.data_ptr(), out.data_ptr())
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _gelu_gradients(h, dout)
        rows, d = _rows(h), dout.reshape(-1, dout.shape[-1]).to(h.dtype).contiguous()
        dh = h.new_empty(h.shape)
        backward = getattr(_kernel(), f"perceivers_geglu{_SUFFIX[h.dtype]}_backward")
        backward(rows.shape[0], rows.shape[1] // 2, rows.stride(0), rows.data_ptr(), d.data_ptr(), dh.data_ptr())
        return dh
