"""The bottom-up Perceiver of ``perceiver_pytorch.experimental`` (ISAB / Set-Transformer style).

Each layer the latents cross-attend the input tokens, and then (except in the last layer) the *input tokens
are updated too*: linear self-attention over the tokens, then the tokens cross-attend the latents. So the
input is refined alongside the latents, as in an induced set attention block.

Unlike perceiver-pytorch (0.8.8–0.11.0), the Fourier features work: the original counts ``input_channels``
twice in the token width and fails with ``fourier_encode_data=True``; here the width is
``input_channels + input_axis · (2K + 1)``. Masks also work (the original's linear attention fails on them).
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import CrossAttentionBlock, KeyValue, SelfAttentionBlock, check_mask
from ..layers.broadcast import per_sample
from ..layers.dense import Linear
from ..validation import check_count, check_like
from .common import LogitsAlias, PooledClassifierHead, tie_schedule
from .variants import GridInput

__all__ = ["BottomUpBlock", "BottomUpPerceiver", "LinearAttention"]


class LinearAttention(nn.Module):
    """Softmax-kernel linear attention over ``[B, M, dim]`` tokens, ``O(M)`` in the token count.

    Per head, queries are softmax-normalised over channels and keys over tokens; a ``[d, d]`` summary
    ``Σ_m q_m ⊗ k_m`` is then applied to every token's value (``out_n = v_n · summary``). This is the
    arrangement of perceiver-pytorch's experimental module (kept for weight compatibility). Masked tokens
    are left out of the key softmax and of the summary.
    """

    def __init__(self, dim: int, *, num_heads: int = 4, head_dim: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        check_count(dim=dim, num_heads=num_heads, head_dim=head_dim)
        inner = num_heads * head_dim
        self.dim, self.num_heads, self.scale = dim, num_heads, head_dim**-0.5
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(dim, inner, bias=False)
        self.to_v = Linear(dim, inner, bias=False)
        self.to_out = Linear(inner, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x [B, M, dim]``, ``mask [B, M]`` (True = attend) → ``[B, M, dim]``."""
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [batch, tokens, {self.dim}], got {got}")
        check_like(x, self, "x")
        mask = check_mask(mask, x.shape[0], x.shape[1], device=x.device)
        q, k, v = (rearrange(f(x), "b m (h d) -> b h m d", h=self.num_heads) for f in (self.to_q, self.to_k, self.to_v))
        q = (q * self.scale).softmax(dim=-1)
        if mask is not None:
            keep = mask[:, None, :, None]  # [B, 1, M, 1]
            k = k.masked_fill(~keep, torch.finfo(k.dtype).min).softmax(dim=-2).masked_fill(~keep, 0.0)
        else:
            k = k.softmax(dim=-2)
        summary = einsum(q, k, "b h m d, b h m e -> b h d e")
        out = einsum(summary, v, "b h d e, b h m d -> b h m e")
        return self.dropout(self.to_out(rearrange(out, "b h m d -> b m (h d)")))


class BottomUpBlock(nn.Module):
    """Latents attend tokens; optionally tokens update (linear self-attention, then attend the latents); then
    latent self-attention. Every sublayer is pre-norm with a residual; feed-forwards are GEGLU, 4× wide.
    """

    def __init__(
        self, *, latent_dim: int, input_dim: int, cross_heads: int, latent_heads: int, cross_dim_head: int,
        latent_dim_head: int, attn_dropout: float, ff_dropout: float, bottom_up: bool,
        input_heads: int = 4, input_dim_head: int = 64,
    ) -> None:
        super().__init__()
        cross = {"num_heads": cross_heads, "qk_channels": cross_heads * cross_dim_head, "qkv_bias": False,
                 "mlp_mult": 4, "activation": "geglu", "attn_dropout": attn_dropout, "ff_dropout": ff_dropout}
        self.cross_attn = CrossAttentionBlock(latent_dim, input_dim, **cross)
        if bottom_up:
            self.norm_input = nn.LayerNorm(input_dim)
            self.input_attn = LinearAttention(input_dim, num_heads=input_heads, head_dim=input_dim_head,
                                              dropout=attn_dropout)
            self.rev_cross_attn = CrossAttentionBlock(input_dim, latent_dim, **cross)
        else:
            self.norm_input = self.input_attn = self.rev_cross_attn = None
        self.latent_attn = SelfAttentionBlock(
            latent_dim, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=False,
            mlp_mult=4, activation="geglu", attn_dropout=attn_dropout, ff_dropout=ff_dropout,
        )

    def forward(
        self, x: Tensor, data: Tensor, *, mask: Tensor | None = None, kv: KeyValue | None = None,
        update_data: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Latents ``x [B, N, D]``, tokens ``data [B, M, C]`` → updated ``(x, data)``."""
        x = self.cross_attn(x, data, mask=mask, kv=kv)
        if update_data:
            if self.input_attn is None:
                raise ValueError("this block was built without the bottom-up (token update) sublayers")
            data = data + self.input_attn(self.norm_input(data), mask=mask)
            data = self.rev_cross_attn(data, x)
        return self.latent_attn(x), data


@configurable
class BottomUpPerceiver(LogitsAlias, nn.Module):
    """``perceiver_pytorch.experimental.Perceiver``: latents and input tokens update each other every layer.

    Inputs ``[B, *axes, input_channels]`` get Fourier features (perceiver-pytorch layout) and a
    ``Linear(C, C)`` projection. Arguments as :class:`perceivers.Perceiver`, plus ``input_heads`` and
    ``input_dim_head`` for the linear attention over tokens (fixed at 4 × 64 in the original). Layers
    ``1..depth-1`` share weights with ``weight_tie_layers``. The last layer skips the token update, so no
    parameters are created for it.
    """

    def __init__(
        self,
        *,
        num_freq_bands: int,
        depth: int,
        max_freq: float,
        input_channels: int = 3,
        input_axis: int = 2,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int = 1000,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        fourier_encode_data: bool = True,
        input_heads: int = 4,
        input_dim_head: int = 64,
    ) -> None:
        super().__init__()
        check_count(num_latents=num_latents, latent_dim=latent_dim, cross_heads=cross_heads, latent_heads=latent_heads,
                    cross_dim_head=cross_dim_head, latent_dim_head=latent_dim_head, input_heads=input_heads,
                    input_dim_head=input_dim_head)
        self.input = GridInput(input_channels=input_channels, input_axis=input_axis, num_freq_bands=num_freq_bands,
                               max_freq=max_freq, fourier_encode_data=fourier_encode_data)
        input_dim = self.context_dim = self.input.num_channels
        self.data_proj = Linear(input_dim, input_dim)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.block_order = tie_schedule(depth, weight_tie_layers)
        # A unique block needs the token-update sublayers if any layer but the last uses it.
        needs_update = {u for step, u in enumerate(self.block_order) if step < depth - 1}
        self.blocks = nn.ModuleList(
            BottomUpBlock(
                latent_dim=latent_dim, input_dim=input_dim, cross_heads=cross_heads, latent_heads=latent_heads,
                cross_dim_head=cross_dim_head, latent_dim_head=latent_dim_head, attn_dropout=attn_dropout,
                ff_dropout=ff_dropout, bottom_up=u in needs_update, input_heads=input_heads,
                input_dim_head=input_dim_head,
            )
            for u in range(max(self.block_order) + 1)
        )
        self.head = PooledClassifierHead(latent_dim, num_classes)  # to_logits, after the mean over latents

    def forward(self, data: Tensor, mask: Tensor | None = None, return_embeddings: bool = False) -> Tensor:
        """``data [B, *axes, input_channels]``, ``mask [B, *axes]`` (True = attend) → ``[B, num_classes]``
        (or the latents ``[B, num_latents, latent_dim]`` with ``return_embeddings``)."""
        tokens = self.data_proj(check_like(self.input(data), self, "data"))  # [B, M, C]
        b, m = tokens.shape[:2]
        mask = check_mask(mask, b, m, device=tokens.device, axes=data.shape[1:-1])
        x = per_sample(self.latents.to(tokens.dtype), b)
        last = len(self.block_order) - 1
        for step, unique in enumerate(self.block_order):
            x, tokens = self.blocks[unique](x, tokens, mask=mask, update_data=step < last)
        return x if return_embeddings else self.head(x.mean(dim=-2))
