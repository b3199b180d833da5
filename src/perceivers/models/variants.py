"""perceiver-pytorch's experimental Perceiver variants: GRU-gated residuals and latent mixing.

* :class:`GatedPerceiver` (``perceiver_pytorch.gated.Perceiver``): both attentions update the latents through a
  ``GRUCell(update, latents)`` instead of a residual add; the feed-forwards keep plain residuals.
* :class:`MixedLatentsPerceiver` (``perceiver_pytorch.mixed_latents.Perceiver``): latent self-attention is
  replaced by an MLP that mixes along the latent axis (MLP-Mixer token mixing).

Both take perceiver-pytorch's ``Perceiver`` arguments (one latent layer per cross-attention), its input layout
``[B, *axes, C]`` with Fourier features appended, and its tying (layer 0 apart, layers ``1..depth-1`` shared).
Weights convert with :func:`perceivers.convert.from_lucidrains_variant`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import (
    Attention,
    CrossAttentionBlock,
    FeedForward,
    FourierPositionEncoding,
    KeyValue,
    check_mask,
)
from ..layers.broadcast import per_sample
from ..layers.dense import Linear, _func_transforms
from ..validation import check_count, check_like
from .common import LogitsAlias, PooledClassifierHead, check_input, flatten_axes, tie_schedule

__all__ = ["GatedPerceiver", "GridInput", "LatentMixer", "MixedLatentsPerceiver"]


class GridInput(nn.Module):
    """Channels-last grid input ``[B, *axes, C]`` → tokens ``[B, M, num_channels]`` (perceiver-pytorch layout).

    Fourier features (``linspace(1, max_freq / 2, K)`` bands, or log-spaced ones with ``freq_base``, per
    axis ``[sin, cos, x]``) are appended after the data channels when ``fourier_encode_data``. No parameters.
    """

    def __init__(
        self, *, input_channels: int, input_axis: int, num_freq_bands: int, max_freq: float,
        fourier_encode_data: bool = True, freq_base: float | None = None,
    ) -> None:
        super().__init__()
        check_count(input_axis=input_axis)
        check_count(minimum=0, input_channels=input_channels)
        if input_channels == 0 and not fourier_encode_data:
            raise ValueError("input_channels=0 (positions as the only input) needs fourier_encode_data=True")
        self.input_channels, self.input_axis = input_channels, input_axis
        self.position_encoding = (
            FourierPositionEncoding(input_axis, num_freq_bands, max_freq, layout="lucidrains", freq_base=freq_base)
            if fourier_encode_data
            else None
        )
        self.num_channels = input_channels + (self.position_encoding.num_channels if fourier_encode_data else 0)

    def forward(self, data: Tensor) -> Tensor:
        check_input(data, name="data", channels=self.input_channels, axes=self.input_axis)
        tokens = flatten_axes(data)
        if self.position_encoding is None:
            return tokens
        feats = self.position_encoding(data.shape[1:-1], device=data.device, dtype=data.dtype)
        return torch.cat((tokens, feats.expand(data.shape[0], -1, -1)), dim=-1)


class _GridPerceiver(LogitsAlias, nn.Module):
    """Latents, tied block schedule, classifier head and forward loop shared by the variants."""

    def __init__(self, *, grid: GridInput, num_latents: int, latent_dim: int, num_classes: int, depth: int,
                 weight_tie_layers: bool) -> None:
        super().__init__()
        check_count(num_latents=num_latents, latent_dim=latent_dim)
        self.input = grid
        self.context_dim = grid.num_channels
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.block_order = tie_schedule(depth, weight_tie_layers)
        self.head = PooledClassifierHead(latent_dim, num_classes)  # to_logits, after the mean over latents

    def forward(self, data: Tensor, mask: Tensor | None = None, return_embeddings: bool = False) -> Tensor:
        """``data [B, *axes, input_channels]``, ``mask [B, *axes]`` (True = attend) → ``[B, num_classes]``
        (or the latents ``[B, num_latents, latent_dim]`` with ``return_embeddings``)."""
        context = check_like(self.input(data), self, "data")
        b, m = context.shape[:2]
        mask = check_mask(mask, b, m, device=context.device, axes=data.shape[1:-1])
        x = per_sample(self.latents.to(context.dtype), b)
        kv_cache: dict[int, KeyValue] = {}  # tied blocks project the shared context once
        for unique in self.block_order:
            block = self.blocks[unique]
            if unique not in kv_cache:
                kv_cache[unique] = block.cross_attn.project_kv(context)
            x = block(x, kv=kv_cache[unique], mask=mask)
        return x if return_embeddings else self.head(x.mean(dim=-2))


def _gru(cell: nn.GRUCell, update: Tensor, state: Tensor) -> Tensor:
    """``GRUCell(update, state)`` applied to every latent: ``[B, N, D]`` × 2 → ``[B, N, D]``."""
    if _func_transforms():  # vmap has no rule for PyTorch's fused cell with a state shared by the samples
        return _gru_operators(cell, update, state)
    out = cell(rearrange(update, "b n d -> (b n) d"), rearrange(state, "b n d -> (b n) d"))
    return rearrange(out, "(b n) d -> b n d", b=state.shape[0])


def _gru_operators(cell: nn.GRUCell, update: Tensor, state: Tensor) -> Tensor:
    """:func:`_gru` in operators: gates ``r, z`` and candidate ``n`` from ``[r z n]``-ordered weights,
    ``(1 - z) · n + z · state``."""
    gi = F.linear(update, cell.weight_ih, cell.bias_ih)
    gh = F.linear(state, cell.weight_hh, cell.bias_hh)
    (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
    r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (state - n)


class GatedBlock(nn.Module):
    """Gated cross-attention, FF, gated self-attention, FF: ``x = GRU(Attn(LN x, LN ctx), x)``; ``x += FF(LN x)``."""

    def __init__(self, *, latent_dim: int, context_dim: int, cross_heads: int, latent_heads: int,
                 cross_dim_head: int, latent_dim_head: int, attn_dropout: float, ff_dropout: float) -> None:
        super().__init__()
        self.cross_attn = CrossAttentionBlock(
            latent_dim, context_dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head, qkv_bias=False,
            query_residual=False, mlp_mult=None, attn_dropout=attn_dropout,
        )
        self.cross_gate = nn.GRUCell(latent_dim, latent_dim)
        self.norm_cross_mlp = nn.LayerNorm(latent_dim)
        self.cross_mlp = FeedForward(latent_dim, 4, "geglu", ff_dropout)
        self.norm_self = nn.LayerNorm(latent_dim)
        self.self_attn = Attention(
            latent_dim, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=False,
            dropout=attn_dropout,
        )
        self.self_gate = nn.GRUCell(latent_dim, latent_dim)
        self.norm_self_mlp = nn.LayerNorm(latent_dim)
        self.self_mlp = FeedForward(latent_dim, 4, "geglu", ff_dropout)

    def forward(self, x: Tensor, *, kv: KeyValue, mask: Tensor | None = None) -> Tensor:
        """Latents ``[B, N, D]`` and the projected context → ``[B, N, D]``."""
        x = _gru(self.cross_gate, self.cross_attn(x, kv=kv, mask=mask), x)
        x = x + self.cross_mlp(self.norm_cross_mlp(x))
        x = _gru(self.self_gate, self.self_attn(self.norm_self(x)), x)
        return x + self.self_mlp(self.norm_self_mlp(x))


class LatentMixer(nn.Module):
    """MLP across the latent axis: ``[B, N, D]`` → ``[B, N, D]`` with hidden width ``mult · N``.

    ``fc1 → GELU → Dropout → fc2`` applied to every channel's column of ``N`` latents (MLP-Mixer token mixing).
    """

    def __init__(self, num_latents: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(num_latents, num_latents * mult)
        self.fc2 = Linear(num_latents * mult, num_latents)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = rearrange(x, "b n d -> b d n")
        h = self.fc2(self.dropout(F.gelu(self.fc1(h))))
        return rearrange(h, "b d n -> b n d")


class MixedLatentsBlock(nn.Module):
    """Cross-attention + FF, then ``x += Mixer(LN x)`` and ``x += FF(LN x)``."""

    def __init__(self, *, latent_dim: int, num_latents: int, context_dim: int, cross_heads: int,
                 cross_dim_head: int, attn_dropout: float, ff_dropout: float) -> None:
        super().__init__()
        self.cross_attn = CrossAttentionBlock(
            latent_dim, context_dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head, qkv_bias=False,
            query_residual=True, mlp_mult=4, activation="geglu", attn_dropout=attn_dropout, ff_dropout=ff_dropout,
        )
        self.norm_mix = nn.LayerNorm(latent_dim)
        self.mixer = LatentMixer(num_latents, 4, ff_dropout)
        self.norm_mlp = nn.LayerNorm(latent_dim)
        self.mlp = FeedForward(latent_dim, 4, "geglu", ff_dropout)

    def forward(self, x: Tensor, *, kv: KeyValue, mask: Tensor | None = None) -> Tensor:
        x = self.cross_attn(x, kv=kv, mask=mask)
        x = x + self.mixer(self.norm_mix(x))
        return x + self.mlp(self.norm_mlp(x))


@configurable
class GatedPerceiver(_GridPerceiver):
    """Perceiver with GRU-gated attention updates (``perceiver_pytorch.gated.Perceiver`` compatible).

    Arguments as :class:`perceivers.Perceiver` (``fourier_encode_data`` added; the original always encodes;
    ``freq_base``: log-spaced bands, as the multi-modality fork's ``perceiver_pytorch.gated.Perceiver``).
    """

    def __init__(
        self,
        *,
        num_freq_bands: int,
        depth: int,
        max_freq: float,
        freq_base: float | None = None,
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
    ) -> None:
        check_count(cross_heads=cross_heads, latent_heads=latent_heads, cross_dim_head=cross_dim_head,
                    latent_dim_head=latent_dim_head)
        grid = GridInput(input_channels=input_channels, input_axis=input_axis, num_freq_bands=num_freq_bands,
                         max_freq=max_freq, fourier_encode_data=fourier_encode_data, freq_base=freq_base)
        super().__init__(grid=grid, num_latents=num_latents, latent_dim=latent_dim, num_classes=num_classes,
                         depth=depth, weight_tie_layers=weight_tie_layers)
        self.blocks = nn.ModuleList(
            GatedBlock(latent_dim=latent_dim, context_dim=grid.num_channels, cross_heads=cross_heads,
                       latent_heads=latent_heads, cross_dim_head=cross_dim_head, latent_dim_head=latent_dim_head,
                       attn_dropout=attn_dropout, ff_dropout=ff_dropout)
            for _ in range(max(self.block_order) + 1)
        )


@configurable
class MixedLatentsPerceiver(_GridPerceiver):
    """Perceiver whose latent self-attention is a latent-axis MLP (``perceiver_pytorch.mixed_latents``).

    Arguments as :class:`perceivers.Perceiver`; ``latent_heads`` and ``latent_dim_head`` are accepted for
    compatibility and unused (there is no latent attention). Unlike the original, unknown keyword arguments
    raise a ``TypeError`` instead of being swallowed.
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
    ) -> None:
        del latent_heads, latent_dim_head  # no latent attention in this variant
        check_count(cross_heads=cross_heads, cross_dim_head=cross_dim_head)
        grid = GridInput(input_channels=input_channels, input_axis=input_axis, num_freq_bands=num_freq_bands,
                         max_freq=max_freq, fourier_encode_data=fourier_encode_data)
        super().__init__(grid=grid, num_latents=num_latents, latent_dim=latent_dim, num_classes=num_classes,
                         depth=depth, weight_tie_layers=weight_tie_layers)
        self.blocks = nn.ModuleList(
            MixedLatentsBlock(latent_dim=latent_dim, num_latents=num_latents, context_dim=grid.num_channels,
                              cross_heads=cross_heads, cross_dim_head=cross_dim_head, attn_dropout=attn_dropout,
                              ff_dropout=ff_dropout)
            for _ in range(max(self.block_order) + 1)
        )
