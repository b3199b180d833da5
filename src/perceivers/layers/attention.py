"""Multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``.

Conventions used throughout perceivers:

* queries ``x`` are ``[B, Q, q_dim]``, the context (keys/values) is ``[B, K, kv_dim]``;
* boolean masks use **True = attend** (the polarity of ``perceiver-pytorch`` and of SDPA);
* a query row whose keys are all masked out returns **zeros** before the output projection (as
  DeepMind's code does), never NaN, in every dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from . import dense, native_attention, onednn_attention, wide_attention
from .dense import Linear, _autocast_operands, _func_transforms, _records_graph, linear
from .sdpa import sdpa
from .stream import CHUNK_VALUES, MIN_WIDE_CHUNK, chunk_bounds, loop_step

__all__ = [
    "Attention", "KeyValue", "attend_heads", "attention_weights", "check_mask", "fold_is_cheaper", "fused_export",
    "native_export", "record_attention",
]

KeyValue = tuple[Tensor, Tensor]
"""Projected keys and values, each ``[B, H, K, d]``."""

# Attention.forward_chunked's online-softmax loop (autograd, dropout, CUDA, compile) takes at most this many
# scores (batch × heads × queries × keys) per step, and at least MIN_STEP_KEYS keys: 32 MiB in float32 (a chunk
# of 65536 keys for the README Perceiver's 256 latents made 64 MiB per score-sized tensor, ≈0.43 GiB live in its
# backward). Not smaller: glibc serves blocks under 32 MiB from its heap once freed large blocks have raised its
# mmap threshold, and 16 MiB steps between the small tensors each step keeps for the backward fragmented it
# (peak resident 0.81 GiB at 512², 2.4 GiB at 1024², against 0.21–0.23 GiB live).
STEP_SCORES = 1 << 23
# Streamed inference on CUDA takes the fused kernel per chunk from this many query rows (batch × heads × queries):
# the reduced vision model at batch 32 (4096 rows) went 0.045 → 0.023 s with it and chunks sized for the GPU
# (CUDA_CHUNK_VALUES) on an H100; see _cuda_lse_available
CUDA_FUSED_MIN_ROWS = 4096
MIN_STEP_KEYS = 512


def check_mask(
    mask: Tensor | None, batch: int, length: int, name: str = "mask", *, device: torch.device | None = None,
    axes: Sequence[int] | None = None,
) -> Tensor | None:
    """Validate a boolean key mask and return it as ``[B, length]``.

    Accepts ``[B, length]``, or ``[B, *axes]`` where the data's ``axes`` are given (any ``[B, *axes]``
    whose axes multiply to ``length`` where they are not); with ``device``, the mask must be on it (the
    device of the tensor it masks).
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool (True = attend), got {mask.dtype}")
    grid = tuple(axes) if axes is not None and len(axes) > 1 else None
    if grid:  # compared by rank first: [B, H, W] against (H·W,) would guard H != H·W (W = 1 refused) when exported
        fits = mask.shape[1:] == ((length,) if mask.ndim == 2 else grid)
    else:
        fits = mask.ndim >= 2 and mask[0].numel() == length
    if mask.ndim < 2 or mask.shape[0] != batch or not fits:
        shapes = (f"[batch={batch}, {', '.join(map(str, grid))}] (the data's axes) or [batch, {length}]" if grid
                  else f"[batch={batch}, {length}] (or [batch, *axes] with {length} elements per sample)")
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(mask.shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"{name} is on device {mask.device} but the data is on {device}; move the mask")
    return mask.reshape(batch, length)


class Attention(nn.Module):
    """Multi-head attention with separate query/key and value widths.

    Args:
        q_dim: channels of the queries ``x``.
        kv_dim: channels of the context; defaults to ``q_dim`` (self-attention).
        num_heads: number of heads; ``qk_channels`` and ``v_channels`` must divide by it.
        qk_channels: total width of queries and keys (heads × width per head); default ``q_dim``.
        v_channels: total width of values; default ``qk_channels``.
        out_dim: output channels; default ``q_dim``.
        qkv_bias: biases on the q, k and v projections (DeepMind: yes; perceiver-pytorch: no).
        out_bias: bias on the output projection.
        dropout: dropout on the attention probabilities (training only).

    Attributes:
        fold_kv: attend in the context's own space (``None``: decided per call by
            :func:`fold_is_cheaper` from the numbers of queries and keys; ``True``/``False`` force
            it). Keys ``k = c W_kᵀ + b_k`` give scores ``q·k = (q W_k)·c + q·b_k``; the last term is
            the same for every key, so it cancels in the softmax, and the queries are mapped once into
            the context's space instead of every key into the head's. Values: the weighted sum of
            ``c`` is projected by ``W_v`` afterwards (``+ b_v``, as the weights sum to 1). Exact up to
            float rounding; fully masked rows are zeroed either way. Never while dropout drops
            attention weights (training with ``dropout > 0``: the kept weights do not sum to 1).
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int | None = None,
        *,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        out_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        kv_dim = q_dim if kv_dim is None else kv_dim
        qk_channels = q_dim if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        out_dim = q_dim if out_dim is None else out_dim
        for label, width in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if width % num_heads:
                raise ValueError(f"{label}={width} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q_dim, self.kv_dim, self.out_dim = q_dim, kv_dim, out_dim
        self.qk_channels, self.v_channels = qk_channels, v_channels
        if not 0.0 <= dropout <= 1.0:  # as nn.Dropout checks its probability
            raise ValueError(f"attention dropout must be a probability in [0, 1], got {dropout}")
        self.dropout = dropout
        self.to_q = Linear(q_dim, qk_channels, bias=qkv_bias)
        self.to_k = Linear(kv_dim, qk_channels, bias=qkv_bias)
        self.to_v = Linear(kv_dim, v_channels, bias=qkv_bias)
        self.to_out = Linear(v_channels, out_dim, bias=out_bias)
        self.fold_kv: bool | None = None

    def folds(self, inverted: bool = False, *, num_queries: int | None = None, length: int | None = None) -> bool:
        """Whether :meth:`forward` attends in the context's own space (see ``fold_kv``).

        ``num_queries`` and ``length`` (keys) feed the cost model (:func:`fold_is_cheaper`); ``None``
        stands for "many". Inverted attention, precomputed keys/values and attention dropout in training
        (its weights do not sum to 1, so ``b_v`` would not be weighted like the values) never fold.
        """
        if inverted or self.fold_kv is False or (self.training and self.dropout > 0):
            return False
        if self.fold_kv:
            return True
        head_width = (self.qk_channels + self.v_channels) // self.num_heads
        # a symbolic size (torch.export / compile with dynamic shapes) counts as "many": one choice for every
        # size, not a guard on it in the program (both choices compute the same attention)
        num_queries, length = (None if isinstance(n, torch.SymInt) else n for n in (num_queries, length))
        return fold_is_cheaper(self.kv_dim, head_width, num_queries, length)

    def project_kv(self, context: Tensor) -> KeyValue:
        """``[B, K, kv_dim]`` → keys ``[B, H, K, dk]`` and values ``[B, H, K, dv]``.

        Exposed so that callers attending the same context several times with the same weights
        (tied cross-attention layers) project it once.
        """
        if context.shape[-1] != self.kv_dim:
            raise ValueError(f"context must have {self.kv_dim} channels, got {context.shape[-1]}")
        k = rearrange(self.to_k(context), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.to_v(context), "b n (h d) -> b h n d", h=self.num_heads)
        return k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        query_mask: Tensor | None = None,
        kv: KeyValue | None = None,
        inverted: bool = False,
    ) -> Tensor:
        """Attend ``x [B, Q, q_dim]`` to ``context [B, K, kv_dim]`` (itself if None).

        Args:
            mask: boolean key mask ``[B, K]``, True = attend.
            query_mask: boolean ``[B, Q]``; rows that are False return zeros before ``to_out``.
            kv: keys/values from :meth:`project_kv`, used instead of ``context``.
            inverted: slot-attention style normalisation (softmax over queries, then over keys).

        Returns:
            ``[B, Q, out_dim]``.
        """
        mask, query_mask = self._check_call(x, context, kv, mask, query_mask)
        q = self._project_queries(x)
        dropout = self.dropout if self.training else 0.0
        row_valid, attn_mask = _key_masks(mask)

        c = x if context is None else context
        if kv is None and self.folds(inverted, num_queries=x.shape[1], length=c.shape[1]):
            if c.shape[-1] != self.kv_dim:
                raise ValueError(f"context must have {self.kv_dim} channels, got {c.shape[-1]}")
            # cast before expanding over the heads, where a cast would copy the context once per head
            c = _autocast_operands(_pad_channels(c))[0][:, None].expand(-1, self.num_heads, -1, -1)  # [B, H, K, C']
            qc = _pad_channels(self._fold_queries(q))
            scale = self.qk_channels // self.num_heads
            out = attend_heads(qc, c, c, attn_mask, dropout, scale=scale**-0.5)
            out = self._unfold_values(out[..., : self.kv_dim])
        else:
            k, v = kv if kv is not None else self.project_kv(x if context is None else context)
            if inverted:
                out = _inverted_attention(q, k, v, attn_mask, dropout)
            else:
                out = attend_heads(q, k, v, attn_mask, dropout)
        return self._output(out, row_valid, query_mask)

    def forward_with_weights(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        query_mask: Tensor | None = None,
        kv: KeyValue | None = None,
        inverted: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` with the attention weights written out: ``(output [B, Q, out_dim], weights [B, H, Q, K])``.

        ``weights = softmax(q kᵀ · d_k^-½)`` over the unmasked keys (masked keys get exactly 0; a sample
        without any unmasked key, whose output is zero, gets zero weights), after dropout in training (the
        tensor that multiplies the values, as transformers returns it). Never
        folds and never calls SDPA, so it is slower and its output differs from :meth:`forward` by
        float rounding only. Used by :func:`record_attention`.
        """
        mask, query_mask = self._check_call(x, context, kv, mask, query_mask)
        q = self._project_queries(x)
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        dropout = self.dropout if self.training else 0.0
        row_valid, attn_mask = _key_masks(mask)
        if inverted:
            weights = _inverted_weights(q, k, attn_mask, dropout)
        else:
            weights = F.dropout(attention_weights(q, k, attn_mask), dropout)  # [B, H, Q, K]
        out = self._output(torch.matmul(weights, v), row_valid, query_mask)
        return out, weights if row_valid is None else weights * row_valid.to(weights.dtype)

    def _check_call(
        self, x: Tensor, context: Tensor | None, kv: KeyValue | None, mask: Tensor | None, query_mask: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Check :meth:`forward`'s arguments (ranks, mask dtypes and shapes); returns the masks as ``[B, ·]``."""
        if not isinstance(x, Tensor) or x.ndim != 3:
            raise ValueError(f"x must be a [batch, queries, {self.q_dim}] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if kv is not None:
            if len(kv) != 2 or any(not isinstance(t, Tensor) or t.ndim != 4 for t in kv):
                raise ValueError("kv must be the (keys [B, H, K, dk], values [B, H, K, dv]) pair of project_kv")
            keys_batch, keys = kv[0].shape[0], kv[0].shape[2]
        else:
            c = x if context is None else context
            if not isinstance(c, Tensor) or c.ndim != 3:
                raise ValueError(f"context must be a [batch, keys, {self.kv_dim}] tensor, got "
                                 f"{tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
            keys_batch, keys = c.shape[0], c.shape[1]
        mask = check_mask(mask, keys_batch, keys, device=x.device)
        query_mask = check_mask(query_mask, x.shape[0], x.shape[1], "query_mask", device=x.device)
        return mask, query_mask

    def _project_queries(self, x: Tensor) -> Tensor:
        """``[B, Q, q_dim]`` → queries ``[B, H, Q, dk]``."""
        if x.shape[-1] != self.q_dim:
            raise ValueError(f"queries must have {self.q_dim} channels, got {x.shape[-1]}")
        return rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)

    def _output(self, out: Tensor, row_valid: Tensor | None, query_mask: Tensor | None) -> Tensor:
        """Heads ``[B, H, Q, dv]`` → ``[B, Q, out_dim]``, rows without a valid key or query zeroed first."""
        if row_valid is not None:
            out = out * row_valid.to(out.dtype)
        if query_mask is not None:
            out = out * query_mask[:, None, :, None].to(out.dtype)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    # ------------------------------------------------------------------ attending in the context's space

    def _fold_queries(self, q: Tensor) -> Tensor:
        """``q [B, H, Q, dk]`` → ``q W_k`` per head ``[B, H, Q, kv_dim]``."""
        wk = self.to_k.weight.view(self.num_heads, -1, self.kv_dim).to(q.dtype)  # [H, dk, C]
        if self.num_heads == 1:  # one dense product over every row (oneDNN's where it pays), not B batched ones
            return linear(q[:, 0], wk[0].t())[:, None]
        return torch.matmul(q, wk)

    def _unfold_values(self, out: Tensor) -> Tensor:
        """Weighted sums of the context ``[B, H, Q, kv_dim]`` → values ``[B, H, Q, dv]`` (``W_v``, ``+ b_v``)."""
        wv = self.to_v.weight.view(self.num_heads, -1, self.kv_dim).to(out.dtype)  # [H, dv, C]
        out = linear(out[:, 0], wv[0])[:, None] if self.num_heads == 1 else torch.matmul(out, wv.transpose(-1, -2))
        if self.to_v.bias is not None:
            out = out + self.to_v.bias.view(self.num_heads, 1, -1).to(out.dtype)
        bk = self.to_k.bias
        if bk is not None and bk.requires_grad and torch.is_grad_enabled():
            # b_k cancels in the softmax, so its gradient is exactly 0; keep it in the graph all the
            # same, so that every parameter gets a gradient (DistributedDataParallel expects one).
            out = out + 0.0 * bk.sum().to(out.dtype)
        return out

    # ------------------------------------------------------------------ streaming over key/value chunks

    def _streamed_output(self, out: Tensor, fold: bool, mask: Tensor | None, query_mask: Tensor | None) -> Tensor:
        """A streamed attention's per-head result ``[B, H, N, ·]`` → ``[B, N, out_dim]``: values unfolded, samples
        without a visible key and masked queries zeroed, heads merged and projected."""
        if fold:
            out = self._unfold_values(out[..., : self.kv_dim])
        if mask is not None:
            out = out * mask.any(-1)[:, None, None, None].to(out.dtype)
        if query_mask is not None:
            out = out * query_mask[:, None, :, None].to(out.dtype)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def forward_chunked(
        self,
        x: Tensor,
        chunk: Callable[[int, int], Tensor],
        length: int,
        *,
        chunk_size: int,
        mask: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend ``x [B, Q, q_dim]`` to a context produced ``chunk_size`` keys at a time.

        ``chunk(start, stop)`` returns the (normalised) context rows ``start:stop`` ``[B, n, kv_dim]``;
        only one chunk exists at a time. Partial results are merged with a running log-sum-exp
        (online softmax), so the output equals :meth:`forward` on the whole context up to float
        rounding, and memory does not grow with ``length``. With autograd on, each chunk is
        recomputed in the backward pass (activation checkpointing), so training memory stays
        bounded too. Same conventions as :meth:`forward` (mask True = attend; fully masked rows → 0).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        q = self._project_queries(x) * (self.qk_channels // self.num_heads) ** -0.5
        fold = self.folds(num_queries=x.shape[1], length=length)
        if fold:
            q = _pad_channels(self._fold_queries(q))
        dropout = self.dropout if self.training else 0.0
        grad = torch.is_grad_enabled() and (q.requires_grad or any(p.requires_grad for p in self.parameters())
                                            or _stream_requires_grad(chunk, length))

        def keys_values(start: int, stop: int) -> KeyValue:
            c = chunk(start, stop)
            if fold:
                c = _pad_channels(c.to(q.dtype))[:, None].expand(-1, self.num_heads, -1, -1)
                return c, c
            k, v = self.project_kv(c)
            return k.to(q.dtype), v.to(q.dtype)

        b, h, n = q.shape[:3]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)  # float64 stays float64
        # the fused kernel takes keys and values of one width (folded, or as wide per head)
        same_widths = fold or self.qk_channels == self.v_channels
        v_width = q.shape[-1] if fold else self.v_channels // self.num_heads
        fused = (same_widths and _flash_lse_available(q)) or _cuda_lse_available(q, v_width, mask)
        if not grad and not dropout and fused:
            # Fused kernel per chunk (no score matrix in memory); the partial results are merged
            # through their log-sum-exps a group at a time (fewer small operations than pairwise).
            # Partial results go to one buffer allocated up front (small tensors kept alive between
            # the chunks' large temporaries would fragment the heap and raise the peak). A symbolic
            # batch (an exported program, see fused_export) sizes the group as batch 1: no guard on it.
            part_size = (b if isinstance(b, int) else 1) * h * n * v_width
            group = max(2, min(32, (1 << 22) // part_size, -(-length // chunk_size)))  # ≤ 16 MiB, ≤ 32
            outs = lses = None
            count = 0
            for start, stop in chunk_bounds(length, chunk_size):
                k, v = keys_values(start, stop)
                bias = None
                if mask is not None:
                    bias = torch.zeros(mask[:, start:stop].shape, dtype=q.dtype, device=q.device)
                    bias = bias.masked_fill(~mask[:, start:stop], torch.finfo(q.dtype).min)[:, None, None, :]
                out, lse = _attention_lse(q, k, v, bias)
                if outs is None:
                    outs = out.new_empty((group, *out.shape), dtype=acc_dtype)  # [G, B, H, Q, D]
                    lses = out.new_empty((group, *lse.shape, 1), dtype=acc_dtype)  # [G, B, H, Q, 1]
                outs[count].copy_(out)
                lses[count].copy_(lse.unsqueeze(-1))
                count += 1
                if count == group:
                    _merge_partial(outs, lses, count)
                    count = 1
            out = _merge_partial(outs, lses, count).to(q.dtype)
        else:

            def step(qq: Tensor, m: Tensor, l: Tensor, acc: Tensor, start: int, stop: int):
                k, v = keys_values(start, stop)
                scores = torch.matmul(qq, k.transpose(-1, -2)).to(acc_dtype)  # [B, H, Q, n]
                if mask is not None:
                    keep = mask[:, None, None, start:stop]
                    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
                m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
                alpha = torch.exp(m - m_new)
                p = torch.exp(scores - m_new)
                l = l * alpha + p.sum(-1, keepdim=True)
                if dropout:
                    p = F.dropout(p, dropout)
                acc = acc * alpha + torch.matmul(p.to(v.dtype), v).to(acc_dtype)
                return m_new, l, acc

            m = q.new_full((b, h, n, 1), float("-inf"), dtype=acc_dtype)
            l = q.new_zeros((b, h, n, 1), dtype=acc_dtype)
            acc = q.new_zeros((b, h, n, v_width), dtype=acc_dtype)
            # A step's score-sized tensors (scores, probabilities and, in the backward, their gradients: about
            # seven at once) hold at most STEP_SCORES elements, however many keys a chunk has; a symbolic batch
            # counts as 1 (no guard).
            rows = (b if isinstance(b, int) else 1) * h * (n if isinstance(n, int) else 1)
            step_size = min(chunk_size, max(MIN_STEP_KEYS, STEP_SCORES // max(rows, 1)))
            for start, stop in chunk_bounds(length, step_size):
                if grad:
                    m, l, acc = checkpoint(step, q, m, l, acc, start, stop, use_reentrant=False)
                else:
                    m, l, acc = step(q, m, l, acc, start, stop)
            out = (acc / l).to(q.dtype)
        return self._streamed_output(out, fold, mask, query_mask)

    def forward_looped(
        self,
        x: Tensor,
        rows: Callable[[Tensor], Tensor],
        length: int,
        *,
        chunk_size: int,
        mask: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> Tensor:
        """:meth:`forward_chunked` for a symbolic ``length`` (``torch.export`` with dynamic sizes): one
        ``torch.while_loop`` over chunks of at most ``chunk_size`` keys, so that the exported program (and its
        ONNX ``Loop``) holds one chunk at a time whatever the input's size. ``rows(index)`` returns the
        (normalised) context rows at the positions ``index`` (int64 ``[n]``) ``[B, n, kv_dim]``; the last chunk
        gathers its missing rows again and masks them out. Inference only (no dropout, no autograd).
        """
        from torch._higher_order_ops.while_loop import while_loop

        q = self._project_queries(x) * (self.qk_channels // self.num_heads) ** -0.5
        fold = self.folds(num_queries=x.shape[1], length=length)
        if fold:
            q = _pad_channels(self._fold_queries(q))
        b, h, n = q.shape[:3]
        acc_dtype = torch.promote_types(q.dtype, torch.float32)
        v_width = q.shape[-1] if fold else self.v_channels // self.num_heads
        fused = (fold or self.qk_channels == self.v_channels) and _flash_lse_available(q)
        # a wide context's chunk holds at most CHUNK_VALUES values per sample, as eager streaming's (auto_chunk_size):
        # DeepMind's 261-channel image tokens in chunks of 8035 rows, not 65536 (68 MB, copied by the norm and pad)
        chunk_size = min(chunk_size, max(MIN_WIDE_CHUNK, CHUNK_VALUES // self.kv_dim))
        if not fused:  # the online softmax's score-sized temporaries: STEP_SCORES // 4 elements per step
            queries = (b if isinstance(b, int) else 1) * h * (n if isinstance(n, int) else 1)
            chunk_size = min(chunk_size, max(MIN_STEP_KEYS, STEP_SCORES // (4 * max(queries, 1))))
        size = loop_step(chunk_size, length)  # a length of 1 repeats its key, masked
        offsets = torch.arange(size, device=q.device)
        low = torch.finfo(acc_dtype).min

        def keys_values(index: Tensor) -> KeyValue:
            c = rows(index)
            if fold:
                c = _pad_channels(c.to(q.dtype))[:, None].expand(-1, self.num_heads, -1, -1)
                return c, c
            k, v = self.project_kv(c)
            return k.to(q.dtype), v.to(q.dtype)

        def chunk_keys(i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            index = i * size + offsets  # [n]
            keep = (index < length)[None]  # [1, n]: the last chunk's repeated rows are no keys
            index = index.clamp(max=length - 1)
            if mask is not None:
                keep = keep & mask.index_select(1, index)
            return *keys_values(index), keep[:, None, None, :]  # keep: [B or 1, 1, 1, n]

        def more(i: Tensor, *_: Tensor) -> Tensor:
            return i * size < length

        if fused:  # aten's fused CPU kernel per chunk (pt2 programs, see fused_export): merged by log-sum-exp
            def step(i: Tensor, lse: Tensor, acc: Tensor):
                k, v, keep = chunk_keys(i)
                bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, low)
                out, part = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias,
                                                                                       scale=1.0)
                part = part.unsqueeze(-1).to(acc_dtype)
                total = torch.logaddexp(lse, part)
                return i + 1, _carried(total), _carried(acc * torch.exp(lse - total) + out.to(acc_dtype) * torch.exp(part - total))

            start = (torch.zeros((), dtype=torch.long, device=q.device),
                     q.new_full((b, h, n, 1), float("-inf"), dtype=acc_dtype), q.new_zeros((b, h, n, v_width), dtype=acc_dtype))
            out = while_loop(more, step, start)[2].to(q.dtype)
        else:
            def step(i: Tensor, m: Tensor, l: Tensor, acc: Tensor):
                k, v, keep = chunk_keys(i)
                scores = _head_products(q, k.transpose(-1, -2)).to(acc_dtype).masked_fill(~keep, low)  # [B, H, Q, n]
                m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
                alpha = torch.exp(m - m_new)
                p = torch.exp(scores - m_new)
                return (i + 1, _carried(m_new), _carried(l * alpha + p.sum(-1, keepdim=True)),
                        _carried(acc * alpha + _head_products(p.to(v.dtype), v).to(acc_dtype)))

            start = (torch.zeros((), dtype=torch.long, device=q.device), q.new_full((b, h, n, 1), low, dtype=acc_dtype),
                     q.new_zeros((b, h, n, 1), dtype=acc_dtype), q.new_zeros((b, h, n, v_width), dtype=acc_dtype))
            _, _, l, acc = while_loop(more, step, start)
            out = (acc / l).to(q.dtype)
        return self._streamed_output(out, fold, mask, query_mask)


def _carried(t: Tensor) -> Tensor:
    """``t`` in the contiguous layout of the loop's initial values (a small ``[B, H, Q, …]`` copy): ONNX export's
    non-strict capture traces the loop with symbolic sizes, also at a fixed size, where a keepdim reduction's strides
    (``(…, 1, Q)`` for ``[B, H, Q, 1]``) differ from the carried input's, and refuses the loop (the strict capture it
    falls back to unrolled it: the README Perceiver's static ONNX held every chunk's scores at once, 330 MiB)."""
    return t.clone(memory_format=torch.contiguous_format)


def _head_products(a: Tensor, b: Tensor) -> Tensor:
    """``a [B, H, X, Y] @ b [B, H, Y, Z]`` → ``[B, H, X, Z]`` as one ``bmm`` per head. Inside an exported
    ``torch.while_loop`` a symbolic ``Y`` or ``Z`` (the keys of a chunk, ``min(chunk, length)``) would otherwise meet
    ``matmul``'s reshape of the batch axes, whose view check leaves an unprovable guard ``1 % min(chunk, length) != 0``
    (a length of 1 refused) where the length is one input axis (per-sample coordinates)."""
    return torch.stack([torch.bmm(a[:, i], b[:, i]) for i in range(a.shape[1])], dim=1)


def attend_heads(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale) v`` per head (``[B, H, M, d_k]``, ``[B, H, N, d_k]``, ``[B, H, N, d_v]`` ->
    ``[B, H, M, d_v]``) through SDPA, except on CPU: heads whose widths are multiples of 16 go to the
    native kernels (:mod:`.native_attention`: float32, and bfloat16 where the processor has AVX512-BF16 but
    no AMX; with AMX, bfloat16 training of up to 2²³ scores is written out, :func:`_written_out_on_amx`),
    other wide float32 heads (and narrower ones over many keys) and the other bfloat16 ones to
    :mod:`.onednn_attention`, and where SDPA would take its math path (key and value head widths
    differ, e.g. the language model's 32 and 160) the same computation is written out, without the math
    path's guarded softmax (isneginf / all / where over every score, 3% of the language model's forward), as it
    is under ``torch.func`` transforms and forward-mode AD (SDPA's CPU kernel has no batching rule or tangent).
    On CUDA, trained heads wider than the fused kernels take go to :mod:`.wide_attention`."""
    q, k, v = _autocast_operands(q, k, v)
    if q.dtype == torch.bfloat16 and dense.bf16_in_float32(q, k, v):  # float32 arithmetic, as SDPA's bfloat16 kernel
        with torch.autocast("cpu", enabled=False):
            widened = q.float(), k.float(), v.float()
            if native_attention.applies(*widened, attn_mask, dropout) and _records_graph(q, k, v):
                return native_attention.attend_widened(q, k, v, widened, attn_mask, scale)  # keeps bfloat16 heads
            return attend_heads(*widened, attn_mask, dropout, scale).to(torch.bfloat16)
    amx_bf16 = q.dtype == torch.bfloat16 and not torch.compiler.is_compiling() and kernels.has_amx()  # Dynamo: no flags
    if not amx_bf16 and native_attention.applies(q, k, v, attn_mask, dropout):
        return native_attention.attend(q, k, v, attn_mask, scale)  # on AMX oneDNN's bfloat16 products are faster
    if _written_out_on_amx(q, k, v, attn_mask):  # q, k in their own layout: the scores' product 1.1-1.4x faster
        return _written_out(q.contiguous(), k.contiguous(), v, attn_mask, dropout, scale)
    if onednn_attention.applies(q, k, v, attn_mask, dropout):
        return onednn_attention.attend(q, k, v, attn_mask, scale)
    if wide_attention.applies(q, k, v, attn_mask, dropout):
        return wide_attention.attend(q, k, v, scale)
    if (q.device.type != "cpu" or torch.compiler.is_compiling() or (q.shape[-1] == v.shape[-1] and not _func_transforms())
            or (attn_mask is not None and attn_mask.dtype != torch.bool)):
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
    return _written_out(q, k, v, attn_mask, dropout, scale)


def _written_out(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout: float,
                 scale: float | None) -> Tensor:
    """:func:`attend_heads` as its products and softmax, which autograd differentiates."""
    weights = attention_weights(q, k, attn_mask, scale)  # callers keep a key per row (see Attention.forward)
    if dropout:
        weights = F.dropout(weights, dropout)
    return torch.matmul(weights, v)


def _written_out_on_amx(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> bool:
    """Whether bfloat16 CPU heads with autograd on a processor with AMX are attended by :func:`_written_out`: up
    to 2²³ scores, whose probabilities the blocked products (:mod:`.onednn_attention`) keep for the backward too,
    autograd through the same products and the native softmax costs less per call (docs/performance.md, "bfloat16
    training on AMX, written out")."""
    return (not torch.compiler.is_compiling()  # first: Dynamo cannot trace the processor's flags
            and q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.dim() == 4 and kernels.has_amx()
            and (attn_mask is None or attn_mask.dtype == torch.bool) and _records_graph(q, k, v)
            and q.shape[:-1].numel() * k.shape[-2] <= onednn_attention.KEEP_SCORES)


def attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``softmax(q kᵀ · scale)`` written out: ``q [B, H, Q, d]``, ``k [B, H, K, d]`` → ``[B, H, Q, K]``.

    ``scale`` defaults to ``d^-½``; ``attn_mask`` (bool, True = attend, broadcast to the scores) gives masked
    keys exactly 0. A row with no key left is NaN: callers keep one.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return dense.softmax(scores)


def fold_is_cheaper(kv_dim: int, head_width: int, num_queries: int | None = None, length: int | None = None) -> bool:
    """Whether attending in the context's own space costs fewer multiply-adds than projecting it.

    Per head, with ``C = kv_dim`` (``C'`` padded to a multiple of 8 for the fused kernel),
    ``w = d_k + d_v`` (``head_width``), ``N`` queries and ``K`` keys:

    * projected: every key is projected (``C·w``) and met by every query (``N·w``: scores and
      weighted sum), ``K·(C + N)·w``;
    * folded: scores and weighted sums in the context's space, ``K·N·2C'``, plus mapping the
      queries through ``W_k`` and their sums through ``W_v``, ``N·C·w``.

    Training scales both sides alike (the backward pass of each product costs twice its forward),
    so one rule serves both. ``None`` means many: with ``num_queries=None`` the projection's share
    vanishes (the rule becomes ``2C' < w`` for ``K ≫ C``), with ``length=None`` the per-query share.
    """
    c, cp, w = kv_dim, kv_dim + (-kv_dim % 8), head_width
    n, k = num_queries, length
    if n is None:
        return 2 * cp < w if k is None else k * 2 * cp + c * w < k * w
    if k is None:
        return 2 * n * cp < (c + n) * w
    return k * n * 2 * cp + n * c * w < k * (c + n) * w


def _stream_requires_grad(chunk: Callable[[int, int], Tensor], length: int) -> bool:
    """Whether a streamed context's rows require grad (an input that does, or trainable modules upstream of a
    frozen attention), probed on its first row. The fused kernel's gradient ignores its log-sum-exp, through
    which the chunks' merge weights depend on the context: such a stream takes the differentiable loop. Not
    probed under ``torch.compile`` (which never takes the fused kernel with autograd)."""
    return length > 0 and not torch.compiler.is_compiling() and chunk(0, 1).requires_grad


def _merge_partial(outs: Tensor, lses: Tensor, count: int) -> Tensor:
    """Attention over ``count`` disjoint key sets → over their union, written to ``outs[0], lses[0]``.

    ``outs [G, B, H, Q, D]`` and ``lses [G, B, H, Q, 1]`` hold each set's output and log-sum-exp.
    """
    if count > 1:
        total = torch.logsumexp(lses[:count], dim=0)
        outs[0] = (outs[:count] * torch.exp(lses[:count] - total)).sum(0)
        lses[0] = total
    return outs[0]


def _pad_channels(t: Tensor, multiple: int = 8) -> Tensor:
    """Zero-pad the last axis to a multiple of 8: the fused CPU attention kernel vectorises better."""
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def _flash_lse_available(q: Tensor) -> bool:
    """Whether the fused CPU attention kernel that also returns the log-sum-exp serves the streamed
    inference: float32 only, as in bfloat16 it computes in float32 and the online softmax over bfloat16
    products is faster (DeepMind's reduced vision model, 224², batch 2: 0.146 → 0.065 s)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
        and (not torch.compiler.is_compiling()
             or (torch.compiler.is_exporting() and not torch.onnx.is_in_onnx_export() and _fused_export))
        and not torch.jit.is_scripting()
    )


def _cuda_lse_available(q: Tensor, v_width: int, mask: Tensor | None) -> bool:
    """Whether CUDA's memory-efficient attention kernel, which also returns the log-sum-exp, serves the streamed
    inference: unmasked, heads a multiple of 8 wide, and at least CUDA_FUSED_MIN_ROWS query rows over the batch
    and heads.

    On an H100 the streamed chunks' online softmax, written out, took the README Perceiver at 224² and batch 32
    to 1.6× perceiver-pytorch's time. The kernel takes it to 0.8×. But the kernel spreads its work over query rows
    only, so one image's 256 latents occupy 4 of the 132 multiprocessors: at 1024², batch 1, it took 0.092 s
    against the online softmax's 0.028 s.
    """
    return (
        q.device.type == "cuda"
        and not torch.compiler.is_compiling()  # first: no guard on a symbolic size below
        and q.shape[0] * q.shape[1] * q.shape[2] >= CUDA_FUSED_MIN_ROWS
        and mask is None
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and q.shape[-1] % 8 == 0 == v_width % 8
        and torch.backends.cuda.mem_efficient_sdp_enabled()
    )


def _attention_lse(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """A fused kernel's attention of one chunk of keys (``q`` already scaled) and its log-sum-exp ``[B, H, Q]``."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=1.0)[:2]
        return out, lse[..., : q.shape[-2]]  # its rows are padded to a multiple of 32
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=1.0)


_fused_export = False  # see fused_export


@contextmanager
def fused_export() -> Iterator[None]:
    """Let ``torch.export`` keep aten's fused CPU attention kernel in streamed attention while the context is open.

    A model exported at a size it streams (inputs above 32768 elements, see
    :func:`perceivers.layers.auto_chunk_size`) then attends each chunk without a score matrix: the README
    Perceiver at 1024×1024 (depth 2, batch 1) ran in 0.81 s instead of 3.67 s, at +13 MiB instead of +137. Such a
    program runs in PyTorch (``torch.export.load``) on CPU; it does not convert to ONNX (the kernel's ONNX
    translation is wrong), so programs meant for ONNX are traced outside the context (``perceivers export``
    uses it for ``.pt2`` files only). ``torch.onnx.export(model, dynamo=True)`` ignores it. Inside it decoders
    that loop over a symbolic query count (:func:`perceivers.layers.loop_rows`) also write each chunk's rows into
    one output in place, instead of stacking them in a ``scan`` and gathering them in order once.
    """
    global _fused_export
    before, _fused_export = _fused_export, True
    try:
        yield
    finally:
        _fused_export = before


@contextmanager
def native_export() -> Iterator[None]:
    """:func:`fused_export`, and ``torch.export`` keeps perceivers' own CPU operators in the program while the
    context is open: the native grid and attention kernels (``perceivers::grid_attention``,
    ``perceivers::native_attention``) and, where oneDNN serves the dense layers, its products
    (``perceivers::onednn_linear``), as ``torch.compile`` keeps them.

    The program then runs at eager mode's speed (the README Perceiver at 1024×1024, depth 2, batch 1: 0.45 s
    against 1.36 s with aten's kernels, exported in 1.8 s instead of 8.5 s), in PyTorch with perceivers imported
    (``import perceivers`` registers the operators before ``torch.export.load``). Where the kernels are not built
    or off (``PERCEIVERS_NATIVE=0``), not on the processor (the attention kernel needs AVX-512) or the tensors are
    not on the CPU, the operators compute the same in PyTorch operations. ``perceivers export --native`` uses it
    for ``.pt2`` files. ``torch.onnx.export`` inside the context ignores it; a program traced inside it does not
    convert to ONNX (ONNX has no such operators).
    """
    before = dense._native_export
    dense._native_export = True
    try:
        with fused_export():
            yield
    finally:
        dense._native_export = before


def pt2_only_export() -> bool:
    """Whether a ``torch.export`` trace is under way inside :func:`fused_export` and outside ONNX export: a program
    for PyTorch only (``.pt2``), which may use what the ONNX conversion refuses."""
    return torch.compiler.is_exporting() and not torch.onnx.is_in_onnx_export() and _fused_export


def _key_masks(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """A key mask ``[B, K]`` → (``row_valid [B, 1, 1, 1]``: the sample has a valid key, the attention mask
    ``[B, 1, 1, K]``). A sample without any valid key attends everything (no NaN anywhere) and its rows
    are zeroed afterwards (``row_valid``)."""
    if mask is None:
        return None, None
    key_mask = mask[:, None, None, :]
    row_valid = key_mask.any(-1, keepdim=True)
    return row_valid, key_mask | ~row_valid


def _inverted_weights(q: Tensor, k: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    """Softmax over the queries (competition for keys), masked, then L1-normalised over keys: ``[B, H, Q, K]``."""
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
    attn = sim.softmax(dim=-2)
    if mask is not None:
        attn = attn.masked_fill(~mask, 0.0)
    attn = F.normalize(attn, p=1, dim=-1, eps=1e-8)
    return F.dropout(attn, dropout)


def _inverted_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    """Slot-attention style attention (see :func:`_inverted_weights`)."""
    return torch.einsum("bhij,bhjd->bhid", _inverted_weights(q, k, mask, dropout), v)


# ---------------------------------------------------------------------------- recording attention weights

Record = tuple[Attention, Tensor]
"""One call of an :class:`Attention` module and its weights ``[B, H, Q, K]``."""


@contextmanager
def record_attention(module: nn.Module) -> Iterator[list[Record]]:
    """Record the attention weights of every :class:`Attention` inside ``module`` while the context is open.

    Yields a list that fills with ``(attention module, weights [B, H, Q, K])`` in call order (a layer
    applied several times, like the encoder's shared blocks, appears once per call). Inside the
    context the layers compute through :meth:`Attention.forward_with_weights` (explicit softmax, no
    SDPA, no folding; a streamed context is gathered whole first), so memory grows with the number of
    queries × keys. Outside it nothing changes: the layers' class methods are untouched, the context
    only shadows ``forward`` / ``forward_chunked`` on the instances and removes them on exit.

    Attention computed outside :class:`Attention` (the native grid kernel of
    :mod:`perceivers.layers.grid_attention`, fed by streamed image preprocessors) is not seen: callers
    build their inputs whole while recording (:class:`perceivers.io.PerceiverIOModel` does).
    """
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    if any("forward" in m.__dict__ for m in layers):
        raise RuntimeError("record_attention is already active on (part of) this module; contexts do not nest")
    records: list[Record] = []
    for layer in layers:
        layer.forward = partial(_forward_recorded, layer, records)
        layer.forward_chunked = partial(_forward_chunked_recorded, layer, records)
    try:
        yield records
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("forward_chunked", None)


def _forward_recorded(layer: Attention, records: list[Record], x: Tensor, context: Tensor | None = None,
                      **kwargs) -> Tensor:
    out, weights = layer.forward_with_weights(x, context, **kwargs)
    records.append((layer, weights))
    return out


def _forward_chunked_recorded(layer: Attention, records: list[Record], x: Tensor, chunk: Callable[[int, int], Tensor],
                              length: int, *, chunk_size: int, mask: Tensor | None = None,
                              query_mask: Tensor | None = None) -> Tensor:
    context = torch.cat([chunk(a, z) for a, z in chunk_bounds(length, chunk_size)], dim=1)
    return _forward_recorded(layer, records, x, context, mask=mask, query_mask=query_mask)
