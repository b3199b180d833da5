"""Pre-norm attention blocks: the residual structure shared by every Perceiver."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import grid_attention
from .attention import Attention, KeyValue
from .mlp import Activation, FeedForward
from .stream import ContextStream, auto_chunk_size, onnx_loops

__all__ = [
    "MIN_NORMALISED_CHANNELS",
    "CrossAttentionBlock",
    "NarrowContextWarning",
    "SelfAttentionBlock",
    "default_qk_channels",
]

MIN_NORMALISED_CHANNELS = 4
"""A cross-attention warns when its context or queries are narrower: LayerNorm over 1 channel gives a
constant, over 2 only the sign of their difference, over 3 loses offset and scale of every element."""


class NarrowContextWarning(UserWarning):
    """A cross-attention normalises a context (or queries) so narrow that its LayerNorm erases most of it."""


def _user_stacklevel() -> int:
    """``stacklevel`` of the first caller outside perceivers and torch, so a warning points at user code."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def default_qk_channels(shape_for_attn: str, *, q_channels: int, kv_channels: int) -> int:
    """A cross-attention's q/k width when none is given: DeepMind's (and transformers') ``shape_for_attn``,
    ``"kv"`` the keys' input width, ``"q"`` the queries'."""
    if shape_for_attn not in ("kv", "q"):
        raise ValueError(f"cross_attention_shape_for_attn must be 'kv' or 'q', got {shape_for_attn!r}")
    return kv_channels if shape_for_attn == "kv" else q_channels


class CrossAttentionBlock(nn.Module):
    """``y = [x +] Attn(LN(x), LN(context))``, then ``y = y + MLP(LN(y))`` (the MLP is optional).

    Queries ``x`` are ``[B, Q, q_dim]``, the context is ``[B, K, kv_dim]``; the output has
    ``out_dim`` channels (default ``q_dim``; must equal it when ``query_residual``).

    Args:
        query_residual: add the queries to the attention output (encoders: yes; most decoders: no).
        mlp_mult: hidden width multiplier of the MLP; ``None`` for no MLP sublayer.
        Other arguments as :class:`~perceivers.layers.Attention` and :class:`~perceivers.layers.FeedForward`.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        *,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        out_dim: int | None = None,
        qkv_bias: bool = True,
        query_residual: bool = True,
        mlp_mult: int | None = 1,
        activation: Activation = "gelu_tanh",
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        out_dim = q_dim if out_dim is None else out_dim
        for role, width in (("context", kv_dim), ("queries", q_dim)):
            if width < MIN_NORMALISED_CHANNELS:
                warnings.warn(
                    f"cross-attention {role} with {width} channel(s): its LayerNorm "
                    + ("maps every element to the same vector, so attention cannot tell them apart" if width == 1
                       else "keeps only part of each element (not its offset and scale)")
                    + "; add position features or project the input to more channels first "
                    "(e.g. fourier_encode_data=True, audio patches); see docs/reliability.md",
                    NarrowContextWarning, stacklevel=_user_stacklevel(),
                )
        if query_residual and out_dim != q_dim:
            raise ValueError(f"query_residual needs out_dim == q_dim, got {out_dim} and {q_dim}")
        self.query_residual = query_residual
        self.norm_q = nn.LayerNorm(q_dim, eps=norm_eps)
        self.norm_kv = nn.LayerNorm(kv_dim, eps=norm_eps)
        self.attn = Attention(
            q_dim, kv_dim, num_heads=num_heads, qk_channels=qk_channels, v_channels=v_channels,
            out_dim=out_dim, qkv_bias=qkv_bias, dropout=attn_dropout,
        )
        if mlp_mult is None:
            self.norm_mlp, self.mlp = None, None
        else:
            self.norm_mlp = nn.LayerNorm(out_dim, eps=norm_eps)
            self.mlp = FeedForward(out_dim, mlp_mult, activation, ff_dropout)
        # Attend a long context tensor chunk by chunk (see ``auto_chunk_size``): ``None`` streams
        # contexts above 32768 elements when no gradient is needed, ``0`` never, ``n > 0`` always
        # in chunks of ``n`` (with autograd too, recomputing each chunk in the backward pass).
        self.chunk_size: int | None = None

    def _stream_size(self, context: Tensor, inverted: bool) -> int:
        if inverted or torch.compiler.is_compiling():
            return 0
        if self.chunk_size is None and torch.is_grad_enabled() and (
            context.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return 0  # a context tensor that exists whole is not worth recomputing in chunks
        return auto_chunk_size(context.shape[1], self.chunk_size, channels=context.shape[-1], batch=context.shape[0],
                               device=context.device)

    def project_kv(self, context: Tensor) -> KeyValue:
        """Normalise and project the context once; pass the result as ``kv=`` to :meth:`forward`."""
        return self.attn.project_kv(self.norm_kv(context))

    def prepare(self, context: Tensor, *, inverted: bool = False, num_queries: int | None = None) -> KeyValue | Tensor:
        """What :meth:`forward` needs of ``context``, to reuse across calls with the same weights.

        The normalised context ``[B, K, kv_dim]`` when the attention works in the context's own space
        for ``num_queries`` queries (see :attr:`Attention.fold_kv`; ``None``: many), else the
        projected keys and values; pass it as ``kv=``.
        """
        if self.attn.folds(inverted, num_queries=num_queries, length=context.shape[1]):
            return self.norm_kv(context)
        return self.project_kv(context)

    def forward(
        self,
        x: Tensor,
        context: Tensor | ContextStream | None = None,
        *,
        mask: Tensor | None = None,
        query_mask: Tensor | None = None,
        kv: KeyValue | Tensor | ContextStream | None = None,
        inverted: bool = False,
    ) -> Tensor:
        """``x [B, Q, q_dim]``, ``context [B, K, kv_dim]`` (or ``kv``), ``mask [B, K]`` → ``[B, Q, out_dim]``.

        ``context`` may be a :class:`ContextStream` (attended chunk by chunk, bounded memory);
        ``kv`` may be keys/values from :meth:`project_kv` or what :meth:`prepare` returned.
        """
        if kv is None:
            if context is None:
                raise ValueError("CrossAttentionBlock needs a context or precomputed kv")
            if isinstance(context, ContextStream):
                kv = context
            elif size := self._stream_size(context, inverted):
                kv = ContextStream.from_tensor(context, size)
            else:
                kv = self.prepare(context, inverted=inverted, num_queries=x.shape[1])
        q_in = self.norm_q(x)
        if isinstance(kv, ContextStream):
            if inverted:
                kv = self.prepare(kv.materialize(), inverted=True)
            elif kv.grid is not None and grid_attention.applies(self.attn, self.norm_kv, q_in, kv.grid, mask):
                # planes of D + 2 floats per pixel, at most what one chunk of the stream would hold (an exported
                # program's symbolic chunk, the whole image: the kernel's own chunks)
                pixels = kv.chunk_size * kv.channels // (kv.grid.data.shape[-1] + 2)
                y = grid_attention.grid_cross_attention(
                    self.attn, self.norm_kv, q_in, kv.grid, query_mask=query_mask,
                    chunk_pixels=min(grid_attention.GRID_CHUNK, pixels) if isinstance(pixels, int)
                    else grid_attention.GRID_CHUNK,
                )
            elif kv.rows is not None and (not isinstance(kv.length, int)  # symbolic length: torch.export
                                          or (onnx_loops() and not (self.training and self.attn.dropout))):
                stream = kv
                y = self.attn.forward_looped(
                    q_in, lambda index: self.norm_kv(stream.rows(index)), stream.length,
                    chunk_size=stream.chunk_size, mask=mask, query_mask=query_mask,
                )
            else:
                stream, norm = kv, self.norm_kv
                # eps read here, once: under torch.compile(dynamic=True) a float attribute first read inside the
                # chunks' checkpointed steps belongs to the first step's subgraph, and the next step failed on it
                eps = float(norm.eps)
                y = self.attn.forward_chunked(
                    q_in, lambda a, b: F.layer_norm(stream.chunk(a, b), norm.normalized_shape, norm.weight, norm.bias, eps),
                    stream.length, chunk_size=stream.chunk_size, mask=mask, query_mask=query_mask,
                )
        if isinstance(kv, Tensor):
            y = self.attn(q_in, kv, mask=mask, query_mask=query_mask, inverted=inverted)
        elif not isinstance(kv, ContextStream):
            y = self.attn(q_in, mask=mask, query_mask=query_mask, kv=kv, inverted=inverted)
        if self.query_residual:
            y = y + x
        if self.mlp is not None:
            y = y + self.mlp(self.norm_mlp(y))
        return y


class SelfAttentionBlock(nn.Module):
    """``x = x + Attn(LN(x))``, then ``x = x + MLP(LN(x))`` over ``[B, N, dim]``."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        qkv_bias: bool = True,
        mlp_mult: int = 1,
        activation: Activation = "gelu_tanh",
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, dim, num_heads=num_heads, qk_channels=qk_channels, v_channels=v_channels,
            out_dim=dim, qkv_bias=qkv_bias, dropout=attn_dropout,
        )
        self.norm_mlp = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = FeedForward(dim, mlp_mult, activation, ff_dropout)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """``[B, N, dim]`` (optional key mask ``[B, N]``) → ``[B, N, dim]``."""
        x = x + self.attn(self.norm(x), mask=mask)
        return x + self.mlp(self.norm_mlp(x))
