"""Multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``.

Conventions used throughout perceivers:

* queries ``x`` are ``[B, Q, q_dim]``, the context (keys/values) is ``[B, K, kv_dim]``;
* boolean masks use **True = attend** (the polarity of ``perceiver-pytorch`` and of SDPA);
* a query row whose keys are all masked out returns **zeros** before the output projection (as
  DeepMind's code does), never NaN, in every dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["Attention", "KeyValue", "check_mask"]

KeyValue = tuple[Tensor, Tensor]
"""Projected keys and values, each ``[B, H, K, d]``."""


def check_mask(mask: Tensor | None, batch: int, length: int, name: str = "mask") -> Tensor | None:
    """Validate a boolean key mask and return it as ``[B, length]``.

    Accepts ``[B, length]`` or any ``[B, *axes]`` whose axes multiply to ``length``.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool (True = attend), got {mask.dtype}")
    if mask.ndim < 2 or mask.shape[0] != batch or mask[0].numel() != length:
        raise ValueError(
            f"{name} must have shape [batch={batch}, {length}] (or [batch, *axes] with {length} elements per "
            f"sample), got {tuple(mask.shape)}"
        )
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
        self.dropout = dropout
        self.to_q = nn.Linear(q_dim, qk_channels, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, qk_channels, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, v_channels, bias=qkv_bias)
        self.to_out = nn.Linear(v_channels, out_dim, bias=out_bias)

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
        if x.shape[-1] != self.q_dim:
            raise ValueError(f"queries must have {self.q_dim} channels, got {x.shape[-1]}")
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)
        dropout = self.dropout if self.training else 0.0

        row_valid = None
        attn_mask = None
        if mask is not None:
            key_mask = mask[:, None, None, :]  # [B, 1, 1, K]
            row_valid = key_mask.any(-1, keepdim=True)  # [B, 1, 1, 1]
            # A sample without any valid key attends everything (no NaN anywhere) and is zeroed below.
            attn_mask = key_mask | ~row_valid

        if inverted:
            out = _inverted_attention(q, k, v, attn_mask, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        if row_valid is not None:
            out = out * row_valid.to(out.dtype)
        if query_mask is not None:
            out = out * query_mask[:, None, :, None].to(out.dtype)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _inverted_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float) -> Tensor:
    """Softmax over the queries (competition for keys), masked, then L1-normalised over keys."""
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        sim = sim.masked_fill(~mask, torch.finfo(sim.dtype).min)
    attn = sim.softmax(dim=-2)
    if mask is not None:
        attn = attn.masked_fill(~mask, 0.0)
    attn = F.normalize(attn, p=1, dim=-1, eps=1e-8)
    attn = F.dropout(attn, dropout)
    return torch.einsum("bhij,bhjd->bhid", attn, v)
