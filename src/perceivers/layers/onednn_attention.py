"""Attention whose products run on oneDNN, for float32 heads that are wide or long, and for bfloat16 on CPU.

Where the native kernel is built, float32 heads whose widths are multiples of 16 (up to 256) go to it
instead (:mod:`.native_attention`, faster on every shape measured); this path serves the other float32
heads, float32 without a C compiler or under ``torch.compile``, and the bfloat16 heads that the native
bfloat16 kernel does not take (no AVX512-BF16, widths not multiples of 16, ``d_k + d_v ≥ 128`` in training).

PyTorch's fused CPU attention (``F.scaled_dot_product_attention``) computes its blocks' products with
MKL, which runs AVX2 kernels on AMD processors (see :mod:`perceivers.layers.dense`), and in bfloat16 it
computes in float32 internally: it runs no faster than in float32 (the README Perceiver's latent
self-attention, ``[8, 8, 256, 64]``: 7.5 ms in bfloat16, 7.0 ms in float32). Two cases go around it:

* **float32, wide heads** (``d_k + d_v ≥ 192``: DeepMind's configurations, e.g. 128 + 128 in the vision
  model's latent self-attention, 32 + 160 in the language model's cross-attentions) **or long keys**
  (``d_k + d_v ≥ 128`` over ≥ 4096 keys: FlashPerceiver's 64-wide cross-attention head over its
  inputs): computing the products per head with oneDNN's AVX-512 kernels is faster in training
  (docs/performance.md, "Attention products on oneDNN"). Narrower or shorter heads stay on the fused
  kernel, whose single pass over the scores wins there. Per head, the keys go in chunks whose scores
  hold at most ``2**19`` elements (2 MiB, cache-sized) with a running maximum and sum, as flash
  attention does; the rows' log-sum-exp is saved with the output, and the backward recomputes each
  chunk's probabilities from it and runs its four products (``dV = Pᵀ dO``, ``dP = dO Vᵀ``,
  ``dQ = dS K``, ``dK = dSᵀ Q``, with ``dS = P (dP - rowsum(dO · O))``) chunk by chunk.
* **bfloat16** (autocast; where :func:`~perceivers.layers.dense.onednn_bf16_enabled`: AMD processors and
  those with AMX; on AMX, heads of equal widths without autograd go to SDPA's fused forward, faster there, and
  calls with autograd of at most ``KEEP_SCORES`` scores are written out, see ``attention._written_out_on_amx``):
  the products run as batched bfloat16 matrix products (oneDNN), a block of
  samples (or of one sample's heads) at a time, each block's scores at most ``2**21`` elements (4 MiB):
  2.3-4x faster forward, 1.2-2.6x in training. Scores and probabilities are bfloat16, as in the peers
  and PyTorch's math attention; the products accumulate in float32, the softmax is the native kernel's
  (:func:`.dense.softmax`). The backward recomputes the
  probabilities, or keeps a call's when they are at most ``2**23`` (16 MiB), as the recomputation would
  cost more than they weigh; a head's scores are held whole, at most ``2**23`` elements.

The key mask enters as the scores' product's bias (``-inf`` on masked keys; a chunk of masked keys is
skipped). Under ``torch.compile`` the float32 forward and backward are the operators
``perceivers::onednn_attention`` and ``perceivers::onednn_attention_backward`` (bfloat16 stays on SDPA
there); ``torch.export`` sees SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .. import kernels
from .dense import _kernels_usable, _onednn, _onednn_usable, _onednn_weight_grad, _records_graph, softmax

__all__ = ["applies", "attend"]

_MIN_HEAD_WIDTH = 192  # d_k + d_v (float32)
_MIN_SCORES = 1 << 17  # per head (float32): below this the per-call overhead loses
_MIN_LONG_WIDTH, _MIN_LONG_KEYS = 128, 4096  # float32: narrower heads are taken from this many keys on
_CHUNK_SCORES = 1 << 19  # float32: the scores of one chunk of keys (2 MiB), at least _MIN_CHUNK keys
_MIN_CHUNK = 256
_MAX_SCORES = 1 << 23  # per head: the scores held at once (float32: one chunk of keys; bfloat16: all)
_BLOCK_SCORES = 1 << 21  # bfloat16: the scores of one block of samples (4 MiB)
KEEP_SCORES = 1 << 23  # bfloat16: a call's probabilities kept for the backward up to this many (16 MiB)


def applies(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float) -> bool:
    """Whether :func:`attend` serves ``q [B, H, M, d_k]``, ``k [B, H, N, d_k]``, ``v [B, H, N, d_v]``."""
    if not (
        q.dim() == k.dim() == v.dim() == 4
        and dropout == 0.0
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and (attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[-2] == 1))
    ):
        return False
    m, keys = q.shape[-2], k.shape[-2]
    if m == 0 or keys == 0:  # nothing to attend: the general path gives the empty (or zero) result
        return False
    if not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack():
        # a dispatch mode (a FLOP counter such as Lightning's model summary, fake tensors) sees SDPA, whose
        # formula counts the model's backward; this path's backward recomputes the scores in counted products.
        # Asked only outside torch.compile: Dynamo breaks the graph on the dispatch-stack call.
        return False
    if q.dtype == torch.bfloat16:
        if torch.compiler.is_compiling() or (kernels.has_amx() and q.shape[-1] == v.shape[-1]
                                             and not _records_graph(q, k, v)):
            return False  # compiled: SDPA; on AMX, SDPA's fused bfloat16 forward (AMX tiles) is faster
        return m * keys <= _MAX_SCORES and k.dtype == v.dtype == q.dtype and _kernels_usable(q, k, v, bf16=True)
    width = q.shape[-1] + v.shape[-1]
    return (
        _onednn_usable(q, k, v)  # first: never under torch.export, whose symbolic sizes the tests below would guard
        and m * min(keys, _chunk_size(m)) <= _MAX_SCORES
        and ((width >= _MIN_HEAD_WIDTH and m * keys >= _MIN_SCORES)
             or (width >= _MIN_LONG_WIDTH and keys >= _MIN_LONG_KEYS))
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
        return _attention_op(q, k, v, bias, scale)[0]
    if not _records_graph(q, k, v):
        return _forward(q, k, v, bias, scale)[0]
    keep = q.dtype == torch.float32 or q.shape[:3].numel() * k.shape[-2] <= KEEP_SCORES
    return _OneDNNAttention.apply(q, k, v, bias, scale, keep)


def _blocks(q: Tensor, k: Tensor) -> list[tuple]:
    """bfloat16: where the work is split, as indices into ``q, k, v`` (and the output): blocks whose scores
    fit :data:`_BLOCK_SCORES`, of samples ``(slice,)`` or of one sample's heads ``(b, slice)``."""
    batch, heads, m = q.shape[:3]
    per_head = m * k.shape[-2]
    if heads * per_head <= _BLOCK_SCORES:
        step = _BLOCK_SCORES // (heads * per_head)
        return [(slice(b, min(b + step, batch)),) for b in range(0, batch, step)]
    step = max(1, _BLOCK_SCORES // per_head)
    return [(b, slice(h, min(h + step, heads))) for b in range(batch) for h in range(0, heads, step)]


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
    """The output and, with ``keep``, what the backward needs besides ``q, k, v``: in float32 the output
    itself and the rows' log-sum-exp ``[B, H, M, 1]``; in bfloat16 each block's probabilities (without
    ``keep`` its backward recomputes them)."""
    qs = q * scale
    batch, heads, m = q.shape[:3]
    out = q.new_empty(batch, m, heads, v.shape[-1]).permute(0, 2, 1, 3)  # the heads merge as a view later
    with torch.autocast("cpu", enabled=False):
        if q.dtype == torch.float32:
            lse = q.new_empty(batch, heads, m, 1) if keep else None
            for b in range(batch):
                for h in range(heads):
                    out[b, h] = _head_forward(qs[b, h], k[b, h], v[b, h], _key_bias(bias, (b, h)),
                                              None if lse is None else lse[b, h])
            return out, [out, lse] if keep else []
        kept = []
        for i in _blocks(q, k):
            p = softmax(_matmul_t(qs[i], k[i], _key_bias(bias, i)))
            out[i] = _matmul_t(p, v[i].transpose(-1, -2), None)
            if keep:
                kept.append(p)
    return out, kept


def _chunk_size(m: int) -> int:
    """float32: keys per chunk for ``m`` queries, whose scores fit :data:`_CHUNK_SCORES` (≥ :data:`_MIN_CHUNK`)."""
    return max(_MIN_CHUNK, _CHUNK_SCORES // m)


def _chunks(q: Tensor, k: Tensor) -> Iterator[slice]:
    """float32: the keys of one head in chunks of :func:`_chunk_size`."""
    n, size = k.shape[-2], _chunk_size(q.shape[-2])
    return (slice(c, min(c + size, n)) for c in range(0, n, size))


def _head_forward(qs: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, lse: Tensor | None) -> Tensor:
    """One head, float32: ``softmax(qs kᵀ + bias) v`` ``[M, d_v]``, the rows' log-sum-exp written into
    ``lse [M, 1]`` if given; the keys in chunks with a running maximum and sum (as flash attention), one
    chunk as a plain softmax."""
    chunks = list(_chunks(qs, k))
    parts = [c for c in chunks if bias is None or not bias[c].isneginf().all()] or chunks  # masked ones add 0
    if len(parts) == 1:
        c = parts[0]
        scores = _onednn(qs, k[c], None if bias is None else bias[c])
        top = None if lse is None else scores.amax(-1, keepdim=True)
        p = softmax(scores)
        if lse is not None:
            torch.sub(top, p.amax(-1, keepdim=True).log_(), out=lse)  # log Σ exp = max - log p(max)
        return _onednn(p, v[c].t(), None)
    top = total = acc = None
    for c in parts:
        scores = _onednn(qs, k[c], None if bias is None else bias[c])
        new_top = scores.amax(-1, keepdim=True) if top is None else torch.maximum(top, scores.amax(-1, keepdim=True))
        p = scores.sub_(new_top).exp_()
        part = _onednn(p, v[c].t(), None)
        if top is None:
            total, acc = p.sum(-1, keepdim=True), part
        else:
            decay = top.sub_(new_top).exp_()
            total = total.mul_(decay).add_(p.sum(-1, keepdim=True))
            acc = acc.mul_(decay).add_(part)
        top = new_top
    if lse is not None:
        torch.add(top, total.log(), out=lse)
    return acc.div_(total)


def _head_backward(dout: Tensor, qs: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, lse: Tensor, delta: Tensor,
                   dq: Tensor | None, dk: Tensor | None, dv: Tensor | None) -> None:
    """One head, float32: the gradients into ``dq`` (of ``qs``), ``dk``, ``dv`` (those not ``None``), the
    probabilities recomputed per chunk of keys from the forward's log-sum-exp; ``delta`` = rowsum(dout · out)."""
    for c in _chunks(qs, k):
        p = _onednn(qs, k[c], None if bias is None else bias[c]).sub_(lse).exp_()
        if dv is not None:
            dv[c] = _onednn_weight_grad(p, dout)  # pᵀ dout: oneDNN computes the tall [n, d] transposed
        if dq is None and dk is None:
            continue
        ds = _onednn(dout, v[c], None).sub_(delta).mul_(p)  # d loss / d scores
        if dq is not None:
            part = _onednn(ds, k[c].t(), None)
            if c.start:
                dq.add_(part)
            else:
                dq.copy_(part)
        if dk is not None:
            dk[c] = _onednn_weight_grad(ds, qs)


def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
              needs: tuple[bool, bool, bool], saved: Sequence[Tensor] = ()) -> tuple[Tensor | None, ...]:
    """``dq, dk, dv`` (``None`` where not needed) from what :func:`_forward` returned besides the output
    (float32: output and log-sum-exp; bfloat16: kept probabilities, else recomputed)."""
    qs = q * scale
    # full size even where k, v are expanded views; None where no gradient is asked for (frozen parts)
    dq, dk, dv = (torch.empty_like(t) if need else None for t, need in zip((q, k, v), needs))
    with torch.autocast("cpu", enabled=False):
        if q.dtype == torch.float32:
            out, lse = saved
            delta = (dout * out).sum(-1, keepdim=True)
            for b in range(q.shape[0]):
                for h in range(q.shape[1]):
                    _head_backward(dout[b, h], qs[b, h], k[b, h], v[b, h], _key_bias(bias, (b, h)), lse[b, h],
                                   delta[b, h], *(None if g is None else g[b, h] for g in (dq, dk, dv)))
        else:
            for j, i in enumerate(_blocks(q, k)):
                qh, kh, vh, doh = qs[i], k[i], v[i], dout[i]
                p = saved[j] if saved else softmax(_matmul_t(qh, kh, _key_bias(bias, i)))  # [.., M, N]
                if dv is not None:
                    dv[i] = _matmul_t(p.mT, doh.mT, None)
                if dq is None and dk is None:
                    continue
                ds = torch._softmax_backward_data(_matmul_t(doh, vh, None), p, -1, p.dtype)  # d loss / d scores
                if dq is not None:
                    dq[i] = _matmul_t(ds, kh.mT, None)
                if dk is not None:
                    dk[i] = _matmul_t(ds.mT, qh.mT, None)
    if dq is not None:
        dq.mul_(scale)
    return dq, dk, dv


class _OneDNNAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, keep: bool) -> Tensor:
        out, kept = _forward(q, k, v, bias, scale, keep)  # float32: always kept (output, log-sum-exp)
        _save(ctx, q, k, v, bias, scale, kept)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, bias, *saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same gradients from differentiable operations
            return (*_math_gradients(q, k, v, bias, ctx.scale, dout), None, None, None)
        return (*_backward(dout, q, k, v, bias, ctx.scale, ctx.needs_input_grad[:3], saved), None, None, None)


# Under ``torch.compile``: the same as operators (``torch.library``), kept whole in the compiled graphs
# (as the dense layers' products, see :mod:`.dense`). Gradients not asked for come back empty.


@torch.library.custom_op("perceivers::onednn_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """float32: the output and the rows' log-sum-exp (for the backward)."""
    out, (_, lse) = _forward(q, k, v, bias, scale, keep=True)
    return out, lse


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).permute(0, 2, 1, 3), q.new_empty(*q.shape[:3], 1)


@torch.library.custom_op("perceivers::onednn_attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float,
                           out: Tensor, lse: Tensor, need_q: bool, need_k: bool,
                           need_v: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward(dout, q, k, v, bias, scale, (need_q, need_k, need_v), (out, lse))
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@_attention_backward_op.register_fake
def _(dout, q, k, v, bias, scale, out, lse, need_q, need_k, need_v):
    return tuple(torch.empty_like(t) if need else q.new_empty(0) for t, need in zip((q, k, v), (need_q, need_k, need_v)))


def _save(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, saved: Sequence[Tensor] = ()) -> None:
    """What both backwards need: ``q, k, v``, the key bias and what :func:`_forward` returned for it."""
    ctx.save_for_backward(q, k, v, bias, *saved)
    ctx.scale = scale


def _attention_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    _save(ctx, *inputs, output)


def _attention_backward(ctx, dout: Tensor, _dlse: Tensor | None):
    q, k, v, bias, out, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    grads = _attention_backward_op(dout, q, k, v, bias, ctx.scale, out, lse, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _math_scores(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor | None]:
    """The scores ``q kᵀ · scale + bias`` and the rows with every key masked (``None`` without a bias), whose
    probabilities the callers zero (the forward's convention: zero output). Those rows' scores are 0, so the softmax
    underneath stays finite and neither the gradients nor their own gradients are NaN."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is None:
        return scores, None
    empty = torch.isneginf(bias).all(-1, keepdim=True)
    return (scores + bias).masked_fill(empty, 0.0), empty


def _math_gradients(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, dout: Tensor):
    """The backward of :class:`_OneDNNAttention` in batched, differentiable operations."""
    scores, empty = _math_scores(q, k, bias, scale)
    p = scores.softmax(-1)
    if empty is not None:
        p = p.masked_fill(empty, 0.0)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, dv
