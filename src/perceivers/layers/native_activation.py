"""GEGLU (``a · gelu(g)`` over the halves ``[a, g]`` of the last axis), the tanh-approximated GELU and the
softmax over the last axis through native kernels.

PyTorch computes it as a GELU, a product and, in the backward, a GELU derivative, two products and the
concatenation of the halves' gradients: six passes over memory (a quarter of the README Perceiver's
training step went there). The kernel (:mod:`perceivers.kernels`, ``activations.c``) does each direction
in one pass, the backward's GELU derivative sharing the forward's exponential, and saves only its input
(PyTorch's path also keeps ``gelu(g)``). The GELU is the exact one (``erf``), with its relative accuracy
kept far into the negative tail (``activations.c``).

The tanh GELU (DeepMind's MLPs) is PyTorch's ``gelu(approximate="tanh")`` computed through the logistic
function: PyTorch's loop evaluates a tanh per element and takes five times as long as its exact GELU
(``[2, 2048, 256]`` float32: 0.84 against 0.17 ms forward, 0.92 against 0.37 ms backward; the kernel
0.24 and 0.28 ms).

GLU (``a · sigmoid(g)``, FlashPerceiver's gated MLPs) runs through the GEGLU kernel's loops with a sigmoid gate
(:func:`glu`), each direction in one pass where PyTorch's backward takes the sigmoid again, its derivative's products
and the halves' concatenation.

The activation kernels also add the preceding product's bias as they load a row (:func:`takes_bias`: float32
outside autocast), where PyTorch's ``addmm`` would first broadcast it into the product's whole output.

The softmax (the attention's, where it is written out or blocked) runs three passes over a row: its maximum, the
exponentials and their sum in float32 lanes, the scaling; subnormal probabilities and PyTorch's NaN for rows with
a NaN, a +inf or only -inf are kept (``activations.c``). Its forward is 1.5-1.7x PyTorch's from 2¹⁵ elements
(``[2048, 128]``: 44 against 76 µs in float32, 61 against 98 µs in bfloat16, AMX host); below, and for the
backward (as fast), PyTorch's.

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

__all__ = ["applies", "available", "geglu", "gelu_tanh", "glu", "softmax", "softmax_forward", "takes_bias"]

_SIGNATURES = {
    **{f"perceivers_{gated}{kind}{part}": ([ctypes.c_int64] * 3 + [ctypes.c_void_p] * count, None)
       for gated in ("geglu", "glu") for kind in ("", "_bf16") for part, count in (("", 3), ("_backward", 4))},
    **{f"perceivers_gelu_tanh{kind}{part}": ([ctypes.c_int64] * 2 + [ctypes.c_void_p] * count, None)
       for kind in ("", "_bf16") for part, count in (("", 3), ("_backward", 4))},
    **{f"perceivers_softmax{kind}": ([ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2, None) for kind in ("", "_bf16")},
}
_SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}
_MIN_SOFTMAX = 1 << 15  # elements: PyTorch's softmax is as fast below (the call's own cost)


def _kernel():
    return kernels.load("activations", _SIGNATURES, isa="avx2")


def available() -> bool:
    """Whether the native kernel is built and enabled (``PERCEIVERS_NATIVE``), on a processor with AVX2."""
    return _kernel() is not None


def applies(h: Tensor, activation: str = "geglu") -> bool:
    """Whether :func:`geglu` (``activation="geglu"``, ``h [..., 2n]``), :func:`glu` (``"glu"``, likewise),
    :func:`gelu_tanh` (``"gelu_tanh"``) or :func:`softmax` (``"softmax"``, over the last axis) serves ``h``."""
    if activation in ("geglu", "glu"):
        shape_fits = h.dim() >= 1 and h.shape[-1] % 2 == 0
    elif activation == "softmax":
        shape_fits = h.dim() >= 1 and h.numel() >= _MIN_SOFTMAX
    else:
        shape_fits = True
    return (shape_fits and h.numel() > 0 and h.dtype in _SUFFIX
            and _native_eager(h, dtype=h.dtype) and available())


def takes_bias(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the bias of a product ``x Wᵀ + b`` is better added by the activation's kernel that follows it
    (:func:`geglu`, :func:`glu`, :func:`gelu_tanh`): float32 operands outside CPU autocast where the kernel serves
    them. The product then runs without it: PyTorch's ``addmm`` first broadcasts the bias into the whole output, a pass over
    memory of its own (README Perceiver's ``[2048, 512] × [512, 4096]``: 21.7 against 19.9 ms)."""
    return (bias is not None and bias.dim() == 1 and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and _native_eager(x, weight, bias) and x.numel() > 0 and available())  # eager first: no size guards


def geglu(h: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a · gelu(g)`` for ``h + bias = [a, g]``: ``[..., 2n]``, ``bias [2n]`` -> ``[..., n]`` (call where
    :func:`applies`; ``bias`` of ``h``'s dtype, where :func:`takes_bias`)."""
    return _NativeGated.apply(h, bias, "geglu")


def glu(h: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a · sigmoid(g)`` (``F.glu``) for ``h + bias = [a, g]``: ``[..., 2n]``, ``bias [2n]`` -> ``[..., n]`` (call
    where :func:`applies` with ``"glu"``; ``bias`` of ``h``'s dtype, where :func:`takes_bias`)."""
    return _NativeGated.apply(h, bias, "glu")


def gelu_tanh(x: Tensor, bias: Tensor | None = None) -> Tensor:
    """``gelu(x + bias, approximate="tanh")``: ``x [..., n]``, ``bias [n]`` (call where :func:`applies` with
    ``"gelu_tanh"``; ``bias`` of ``x``'s dtype, where :func:`takes_bias`)."""
    return _NativeGELUTanh.apply(x, bias)


def softmax(x: Tensor) -> Tensor:
    """``x.softmax(-1)``, differentiable (call where :func:`applies` with ``"softmax"``)."""
    return _NativeSoftmax.apply(x)


def softmax_forward(x: Tensor) -> Tensor:
    """``x.softmax(-1)`` without autograd: exponentials and sums in float32, rounded once to ``x``'s dtype."""
    x = x.contiguous()
    out = torch.empty_like(x)
    forward = getattr(_kernel(), f"perceivers_softmax{_SUFFIX[x.dtype]}")
    forward(x.numel() // x.shape[-1], x.shape[-1], x.data_ptr(), out.data_ptr())
    return out


def _rows(t: Tensor) -> Tensor:
    """``t`` as rows ``[R, C]`` with contiguous channels (a view where its strides allow)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _gated_gradients(h: Tensor, dout: Tensor, gated: str) -> Tensor:
    """The gradient for ``h`` of GEGLU (``gated="geglu"``) or GLU (``"glu"``) from differentiable operations
    (``create_graph=True``)."""
    value, gate = h.chunk(2, dim=-1)
    if gated == "glu":
        s = torch.sigmoid(gate)
        return torch.cat([dout * s, dout * value * s * (1.0 - s)], dim=-1)
    cdf = 0.5 * (1.0 + torch.erf(gate * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * gate * gate) / math.sqrt(2.0 * math.pi)
    return torch.cat([dout * gate * cdf, dout * value * (cdf + gate * pdf)], dim=-1)


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _bias_gradient(grad: Tensor, bias: Tensor | None, needed: bool) -> Tensor | None:
    """The bias's gradient: the gradient of ``h + bias`` summed over every axis but the last."""
    return grad.reshape(-1, grad.shape[-1]).sum(0) if bias is not None and needed else None


class _NativeGated(torch.autograd.Function):
    """GEGLU or GLU (``gated``) through the native kernel."""

    @staticmethod
    def forward(ctx, h: Tensor, bias: Tensor | None, gated: str) -> Tensor:
        rows = _rows(h)
        bias = None if bias is None else bias.contiguous()
        n = rows.shape[1] // 2
        out = h.new_empty(*h.shape[:-1], n)
        forward = getattr(_kernel(), f"perceivers_{gated}{_SUFFIX[h.dtype]}")
        forward(rows.shape[0], n, rows.stride(0), rows.data_ptr(), _pointer(bias), out.data_ptr())
        ctx.save_for_backward(h, bias)
        ctx.gated = gated
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor | None, None]:
        h, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            dh = _gated_gradients(h if bias is None else h + bias, dout, ctx.gated)
        else:
            rows, d = _rows(h), dout.reshape(-1, dout.shape[-1]).to(h.dtype).contiguous()
            dh = h.new_empty(h.shape)
            backward = getattr(_kernel(), f"perceivers_{ctx.gated}{_SUFFIX[h.dtype]}_backward")
            backward(rows.shape[0], rows.shape[1] // 2, rows.stride(0), rows.data_ptr(), _pointer(bias), d.data_ptr(),
                     dh.data_ptr())
        return dh, _bias_gradient(dh, bias, ctx.needs_input_grad[1]), None


class _NativeGELUTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, bias)  # x itself, not a contiguous copy: second-order gradients reach x through it
        x, bias = x.contiguous(), None if bias is None else bias.contiguous()
        out = torch.empty_like(x)
        forward = getattr(_kernel(), f"perceivers_gelu_tanh{_SUFFIX[x.dtype]}")
        forward(x.numel(), x.shape[-1], x.data_ptr(), _pointer(bias), out.data_ptr())
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor, Tensor | None]:
        x, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: PyTorch's derivative, itself differentiable
            dx = torch.ops.aten.gelu_backward(dout, x if bias is None else x + bias, approximate="tanh")
        else:
            x, d = x.contiguous(), dout.to(x.dtype).contiguous()
            dx = torch.empty_like(x)
            backward = getattr(_kernel(), f"perceivers_gelu_tanh{_SUFFIX[x.dtype]}_backward")
            backward(x.numel(), x.shape[-1], x.data_ptr(), _pointer(bias), d.data_ptr(), dx.data_ptr())
        return dx, _bias_gradient(dx, bias, ctx.needs_input_grad[1])


class _NativeSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = softmax_forward(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        return torch._softmax_backward_data(dout, p, -1, p.dtype)  # itself differentiable (create_graph=True)
