"""Fused attention on CPU through native kernels, float32 and bfloat16, for heads up to 256 channels wide.

PyTorch's fused CPU attention (the flash kernel behind ``F.scaled_dot_product_attention``) computes each
block of scores and each weighted sum as a separate MKL product, which on narrow heads (the language
model's 32 channels, the README model's 64) runs at a third of the machine's float32 rate. The kernel
(:mod:`perceivers.kernels`, ``attention.c``) does the same algorithm with register-tiled products:
per block of 32 queries the keys go by in blocks of 128, the scores (kept transposed, a vector per key
over the block's queries) never leave the first-level cache, the softmax runs online, and the backward
recomputes the probabilities from the rows' log-sum-exp
(``dV = Pᵀ dO``, ``dS = P (dO Vᵀ − rowsum(dO · O))``, ``dQ = dS K``, ``dK = dSᵀ Q``). Queries, keys and
values are read in place through their strides (heads split as views, keys shared by every head).

bfloat16 heads (CPU autocast, or a model cast to bfloat16) go to ``attention_bf16.c``, the same algorithm
with AVX512-BF16 dot products where the processor has them (:func:`available_bf16`; not where it also has AMX,
whose bfloat16 products oneDNN and SDPA run faster: :func:`~perceivers.layers.attention.attend_heads` passes
the kernel by there): scores, softmax and
sums in float32, the probabilities and score gradients rounded to bfloat16 for their products (as GPU
flash attention does), the output rounded once at the end; the gradients come back in bfloat16.

It serves CPU heads whose widths are multiples of 16 (at most 256), float32 outside autocast or
bfloat16 (in training, heads with ``d_k + d_v < 128``), with no mask or a boolean key mask
(``[B|1, H|1, 1, N]``), without dropout, outside tracing, ``torch.export`` (but inside
:func:`~perceivers.layers.attention.native_export`, as operators), ``torch.func`` transforms,
forward-mode AD and dispatch modes (fake tensors, FLOP counters: those see SDPA), on processors with
AVX-512 (:func:`perceivers.kernels.has_avx512`: with AVX2 alone SDPA is as fast), and ``PERCEIVERS_NATIVE``
not off. ``create_graph=True`` gets the same gradients from differentiable batched operations. Under
``torch.compile`` float32 heads go through the same kernel as operators (``perceivers::native_attention``
and its backward), which the compiled graphs keep.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .. import kernels
from .dense import _native_usable, _records_graph
from .onednn_attention import _math_gradients, _math_scores

__all__ = ["applies", "attend", "available", "available_bf16"]

_MAX_WIDTH = 256
# bfloat16 in training: heads narrower than this (d_k + d_v) only. The kernel's backward recomputes the
# probabilities (five products), where the blocked bf16 products keep a small call's (four): from 64 + 64
# channels on, those are as fast or faster in training (docs/performance.md).
_BF16_TRAINING_WIDTH = 128


_SIGNATURES = {
    "perceivers_attention": ([ctypes.c_void_p] * 2 + [ctypes.c_float] + [ctypes.c_void_p] * 6, ctypes.c_int),
    "perceivers_attention_backward": ([ctypes.c_void_p] * 2 + [ctypes.c_float] + [ctypes.c_void_p] * 10, ctypes.c_int),
}
_SIGNATURES_BF16 = {
    "perceivers_attention_bf16": _SIGNATURES["perceivers_attention"],
    "perceivers_attention_bf16_backward": _SIGNATURES["perceivers_attention_backward"],
    "perceivers_attention_bf16_supported": ([], ctypes.c_int),
}


def _kernel(dtype: torch.dtype = torch.float32):
    if dtype == torch.bfloat16:
        return kernels.load("attention_bf16", _SIGNATURES_BF16)
    return kernels.load("attention", _SIGNATURES, isa="avx512")


def _entry(dtype: torch.dtype, part: str = ""):
    """The kernel's forward (``part=""``) or backward (``"_backward"``) function for ``dtype``."""
    bf16 = dtype == torch.bfloat16
    return getattr(_kernel(dtype), f"perceivers_attention{'_bf16' if bf16 else ''}{part}")


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once, not traced (it builds and loads a library)
def available() -> bool:
    """Whether the float32 kernel is built and enabled (``PERCEIVERS_NATIVE``), on a processor with AVX-512."""
    return _kernel() is not None


def available_bf16() -> bool:
    """Whether the bfloat16 kernel is built, enabled and has the processor's AVX512-BF16 dot products."""
    lib = _kernel(torch.bfloat16)
    return lib is not None and bool(lib.perceivers_attention_bf16_supported())


def applies(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float) -> bool:
    """Whether :func:`attend` serves ``q [B, H, M, d_k]``, ``k [B, H, N, d_k]``, ``v [B, H, N, d_v]``."""
    bf16 = q.dtype == torch.bfloat16
    return (
        q.dim() == k.dim() == v.dim() == 4
        and dropout == 0.0
        and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] > 0
        and q.shape[-1] == k.shape[-1]
        and all(t.shape[-1] % 16 == 0 and t.shape[-1] <= _MAX_WIDTH for t in (q, v))
        and (attn_mask is None or _key_mask(attn_mask, q, k))
        and (q.shape[-1] + v.shape[-1] < _BF16_TRAINING_WIDTH or not _records_graph(q, k, v) if bf16
             else not torch.is_autocast_enabled("cpu"))
        # fake tensors, FLOP counters and profilers see SDPA; under torch.compile float32 heads go to the operators
        and _native_usable(q, k, v, dtype=torch.bfloat16 if bf16 else torch.float32, compiled=not bf16)
        and (available_bf16() if bf16 else available())
    )


def _key_mask(attn_mask: Tensor, q: Tensor, k: Tensor) -> bool:
    """Whether ``attn_mask`` is a boolean key mask the kernel reads in place: ``[B|1, H|1, 1, N]`` with the keys'
    ``N`` (SDPA broadcasts a mask of one key, or refuses one that does not fit: it gets those)."""
    return (attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[-2] == 1
            and attn_mask.shape[-1] == k.shape[2] and attn_mask.shape[0] in (1, q.shape[0])
            and attn_mask.shape[1] in (1, q.shape[1]))


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale) v`` → ``[B, H, M, d_v]`` (call where :func:`applies`); ``attn_mask`` is a
    boolean key mask (True = attend) broadcast to ``[B, H, 1, N]``; a row with no key left returns zeros.
    ``scale`` defaults to ``d_k^-½``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, _bias(attn_mask), scale)[0]
    return _NativeAttention.apply(q, k, v, attn_mask, scale)


def _rows(t: Tensor) -> Tensor:
    """``t`` with its channels contiguous (the kernel reads rows through strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias(attn_mask: Tensor | None) -> Tensor | None:
    """A boolean key mask ``[B|1, H|1, 1, N]`` as an additive bias ``[B|1, H|1, N]`` (``-inf`` on masked keys)."""
    if attn_mask is None:
        return None
    bias = torch.zeros(attn_mask.shape[:2] + attn_mask.shape[3:], dtype=torch.float32)  # whatever the default dtype
    return bias.masked_fill_(~attn_mask[:, :, 0], float("-inf"))


def _strides(t: Tensor | None, count: int, batch: int, heads: int) -> list[int]:
    """The first ``count - 1`` axes' strides (0 where ``t`` has size 1 there and is broadcast) and, with
    ``count == 3``, the rows'."""
    if t is None:
        return [0] * count
    lead = [t.stride(i) if t.shape[i] == size else 0 for i, size in enumerate((batch, heads))]
    return lead + ([t.stride(2)] if count == 3 else [])


def _layout(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's ``dims`` (B, H, M, N, d_k, d_v) and ``strides`` (q, k, v, bias, then ``rows``: the output
    in the forward, its gradient in the backward) as int64 arrays."""
    batch, heads = q.shape[:2]
    dims = [batch, heads, q.shape[2], v.shape[2], q.shape[3], v.shape[3]]
    strides = [*_strides(q, 3, batch, heads), *_strides(k, 3, batch, heads), *_strides(v, 3, batch, heads),
               *_strides(bias, 2, batch, heads), *_strides(rows, 3, batch, heads)]
    return torch.tensor(dims, dtype=torch.int64), torch.tensor(strides, dtype=torch.int64)


def _check(status: int, dk: int, dv: int) -> None:
    """Raise for a kernel's failure status (1: widths it does not take, 2: no memory for its buffers)."""
    if status == 2:
        raise MemoryError("native attention: no memory for the kernel's buffers")
    if status:
        raise ValueError(f"native attention takes head widths that are multiples of 16 up to {_MAX_WIDTH}, got {dk} / {dv}")


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """The kernel's forward: the output ``[B, H, M, d_v]`` (a view of ``[B, M, H, d_v]``: the heads merge as a view
    later) and the rows' log-sum-exp ``[B, H, M]`` float32."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    batch, heads, m, dk = q.shape
    out = q.new_empty(batch, m, heads, v.shape[3]).permute(0, 2, 1, 3)
    lse = q.new_empty(batch, heads, m, dtype=torch.float32)
    dims, strides = _layout(q, k, v, bias, out)
    pointers = (q, k, v, bias, out, lse)
    _check(_entry(q.dtype)(dims.data_ptr(), strides.data_ptr(), scale, *(None if t is None else t.data_ptr() for t in pointers)),
           dk, v.shape[3])
    return out, lse


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, out: Tensor, lse: Tensor, scale: float,
              needs: tuple[bool, bool, bool]) -> list[Tensor | None]:
    """The kernel's backward: the gradients of ``q``, ``k``, ``v`` that ``needs`` asks for, in ``q``'s dtype."""
    q, k, v, dout = _rows(q), _rows(k), _rows(v), _rows(dout.to(q.dtype))
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [B, H, M]
    grads = [torch.empty(*q.shape[:2], *t.shape[2:], dtype=torch.float32) if need else None
             for t, need in zip((q, k, v), needs)]  # float32 whatever the default dtype (bf16-true training)
    dims, strides = _layout(q, k, v, bias, dout)
    pointers = (q, k, v, bias, dout, lse, delta, *grads)
    _check(_entry(q.dtype, "_backward")(dims.data_ptr(), strides.data_ptr(), scale, *(None if t is None else t.data_ptr() for t in pointers)),
           q.shape[3], v.shape[3])
    if q.dtype == torch.bfloat16:  # the kernel accumulates in float32
        grads = [None if g is None else g.to(torch.bfloat16) for g in grads]
    return grads


class _NativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
        bias = _bias(attn_mask)
        out, lse = _forward(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)  # q, k, v themselves: create_graph differentiates through them
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        return (*_gradients(dout, *ctx.saved_tensors, ctx.scale, ctx.needs_input_grad[:3]), None, None)


def _gradients(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, out: Tensor, lse: Tensor,
               scale: float, needs: tuple[bool, bool, bool]) -> list[Tensor | None]:
    """The kernel's backward (:func:`_backward`), or under ``create_graph=True`` the same gradients from
    differentiable operations."""
    if torch.is_grad_enabled():
        bias = None if bias is None else bias[..., None, :].to(q.dtype)  # bfloat16 scores stay bfloat16
        return _math_gradients(q, k, v, bias, scale, dout)
    return _backward(dout, q, k, v, bias, out, lse, scale, needs)


def attend_widened(q: Tensor, k: Tensor, v: Tensor, widened: tuple[Tensor, Tensor, Tensor],
                   attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """bfloat16 heads ``q, k, v`` through the float32 kernel (``widened``: them in float32, where :func:`applies`):
    the output rounded to bfloat16; the backward keeps the heads and the output in bfloat16, half what keeping the
    float32 heads would hold, and widens them again (:func:`perceivers.layers.dense.bf16_in_float32`)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _WidenedAttention.apply(q, k, v, *widened, attn_mask, scale)


class _WidenedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, q32: Tensor, k32: Tensor, v32: Tensor, attn_mask: Tensor | None,
                scale: float) -> Tensor:
        bias = _bias(attn_mask)
        out, lse = _forward(q32, k32, v32, bias, scale)
        out = out.to(torch.bfloat16)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, bias, out, lse = ctx.saved_tensors
        grads = _gradients(dout.float(), q.float(), k.float(), v.float(), bias, out, lse, ctx.scale,
                           ctx.needs_input_grad[:3])
        return (*(None if g is None else g.to(torch.bfloat16) for g in grads), None, None, None, None, None)


# Under ``torch.compile`` (float32): the same as operators (``torch.library``), kept whole in the compiled graphs,
# where SDPA would otherwise serve. Gradients not asked for come back empty.


def _served(*tensors: Tensor | None) -> bool:
    """Whether the float32 kernel takes an operator's tensors (built, on this processor, float32 CPU tensors)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors) and available()


def _forward_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`_forward` in PyTorch operations (with the score matrix): where the operator runs without the kernel
    (a program exported with it, run where the kernel is not built or off, or on another device)."""
    scores, empty = _math_scores(q, k, None if bias is None else bias[..., None, :], scale)
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse[..., None])
    if empty is not None:  # a row with every key masked: zeros
        p = p.masked_fill(empty, 0.0)
    batch, heads, m, _ = q.shape
    out = q.new_empty(batch, m, heads, v.shape[3]).permute(0, 2, 1, 3)  # the layout of the kernel's output
    return out.copy_(torch.matmul(p, v)), lse.float()


@torch.library.custom_op("perceivers::native_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`_forward` as an operator (:func:`_forward_math` where the kernel is not served)."""
    return (_forward if _served(q, k, v, bias) else _forward_math)(q, k, v, bias, scale)


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    batch, heads, m, _ = q.shape
    return (q.new_empty(batch, m, heads, v.shape[3]).permute(0, 2, 1, 3),
            q.new_empty(batch, heads, m, dtype=torch.float32))


@torch.library.custom_op("perceivers::native_attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, out: Tensor, lse: Tensor,
                           scale: float, need_q: bool, need_k: bool, need_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_backward` as an operator (the gradients in PyTorch operations where the kernel is not served)."""
    needs = (need_q, need_k, need_v)
    if _served(q, k, v, bias):
        grads = _backward(dout, q, k, v, bias, out, lse, scale, needs)
    else:
        math = _math_gradients(q, k, v, None if bias is None else bias[..., None, :], scale, dout.to(q.dtype))
        grads = [g if need else None for g, need in zip(math, needs)]
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@_attention_backward_op.register_fake
def _(dout, q, k, v, bias, out, lse, scale, need_q, need_k, need_v):
    return tuple(q.new_empty(*q.shape[:2], *t.shape[2:]) if need else q.new_empty(0)
                 for t, need in zip((q, k, v), (need_q, need_k, need_v)))


def _attention_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, bias, scale = inputs
    ctx.save_for_backward(q, k, v, bias, *output)
    ctx.scale = scale


def _attention_backward(ctx, dout: Tensor, _dlse: Tensor | None):
    needs = ctx.needs_input_grad[:3]
    grads = _attention_backward_op(dout, *ctx.saved_tensors, ctx.scale, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)
