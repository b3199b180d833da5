"""Perceiver AR (Hawthorne et al. 2022, arXiv 2202.07765): an autoregressive Perceiver for long contexts.

The last ``num_latents`` positions of the embedded sequence are the latents. One causal
cross-attention lets them attend ``[prefix, latents]`` (in training a random share of the prefix is
dropped, ``cross_attention_dropout``), then causal self-attention layers work on the latents alone;
a final layer maps each latent to logits. Rotary embeddings turn part of every head's query/key
channels by the absolute position (right-aligned: latents sit at the end of the sequence) in the
cross-attention and the first ``num_self_attention_rotary_layers`` self-attention layers.

Matches krasserm's ``perceiver.model.core.PerceiverAR`` and ``perceiver.model.text.clm`` (perceiver-io
0.6.0) for the same weights (:func:`perceivers.convert.krasserm.from_krasserm_perceiver_ar`), and 0.11.0's
left padding (``pad_mask``, True = padding). ``generate`` reuses keys/values between steps only where
that is exact (see :meth:`CausalLanguageModel._next_logits`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import checkpoint

from ..configurable import configurable
from ..layers import Attention, FeedForward
from ..layers.dense import Linear
from ..layers.rotary import RotaryEmbedding, rotate
from ..layers.sdpa import sdpa
from ..validation import check_count, data_dependent_checks
from .common import check_token_ids

__all__ = [
    "CausalCrossAttention",
    "CausalLanguageModel",
    "CausalLanguageModelConfig",
    "CausalSelfAttention",
    "PerceiverAR",
    "TokenInputAdapter",
    "causal_keep_mask",
    "check_pad_mask",
    "pad_positions",
    "top_f",
]


KeyValue = tuple[Tensor, Tensor]  # keys [B, H, K, dk] (rotated), values [B, H, K, dv]


def _angles_for(rotary: RotaryEmbedding, positions: Tensor) -> Tensor:
    """Positions ``[N]`` → angles ``[N, r]``; per-sample positions ``[B, N]`` → ``[B, 1, N, r]``."""
    angles = rotary(positions)
    return angles if positions.ndim == 1 else angles[:, None]


def _keys_values(attn: Attention, context: Tensor, angles: Tensor | None) -> KeyValue:
    """``context [B, K, C]`` → keys (rotated by ``angles`` when given) and values ``[B, H, K, d]``."""
    k, v = attn.project_kv(context)
    return (k if angles is None else rotate(k, angles)), v


def _last(x: Tensor, n: int, dim: int) -> Tensor:
    """The last ``n`` entries of ``x`` along ``dim``, as a new tensor: a slice's view is contiguous only when it
    is the whole axis, which a traced length can't rule out (torch.export would fix the length)."""
    length = x.shape[dim]
    return x.index_select(dim, torch.arange(length - n, length, device=x.device))


def _append(past: KeyValue | None, new: KeyValue) -> KeyValue:
    return new if past is None else (torch.cat((past[0], new[0]), dim=2), torch.cat((past[1], new[1]), dim=2))


def causal_keep_mask(num_queries: int, key_padding: Tensor) -> Tensor:
    """Boolean mask ``[B, 1, Q, K]`` (True = attend) for ``Q`` queries that are the last ``Q`` of ``K`` keys.

    Query ``i`` (sequence position ``K - Q + i``) attends the keys at positions ``≤ K - Q + i`` that
    are not padding (``key_padding [B, K]``, True = padding). A padded query attends itself only, so
    that no row of the softmax is empty (its output is meaningless and never attended).
    """
    k = key_padding.shape[1]
    ones = torch.ones(num_queries, k, dtype=torch.bool, device=key_padding.device)
    causal, before = ones.tril(k - num_queries), ones.tril(k - num_queries - 1)
    return (causal & ~key_padding[:, None, None, :]) | (causal & ~before)


def _attention(attn: Attention, x: Tensor, k: Tensor, v: Tensor, angles_q: Tensor | None,
               keep: Tensor | None) -> Tensor:
    """``x [B, N, C]`` attends keys/values ``[B, H, K, d]`` (K ≥ N); ``x`` is the last N of the K positions.

    Without ``keep`` (a ``[B, 1, N, K]`` boolean mask, True = attend) the attention is causal and
    right-aligned: query ``i`` attends keys ``0 … K - N + i``. Optional rotary angles ``[N, r]`` or
    ``[B, 1, N, r]`` turn the queries (the keys come rotated).
    """
    q = rearrange(attn.to_q(x), "b n (h d) -> b h n d", h=attn.num_heads)
    if angles_q is not None:
        q = rotate(q, angles_q)
    n, m = q.shape[2], k.shape[2]
    dropout = attn.dropout if attn.training else 0.0
    if keep is not None:
        out = sdpa(q, k, v, attn_mask=keep, dropout_p=dropout)
    elif statically_known_true(n == m):  # a traced K that may equal N takes the mask (the same attention)
        out = sdpa(q, k, v, dropout_p=dropout, is_causal=True)
    else:  # SDPA's is_causal aligns top-left; the latents are the last queries, so align bottom-right
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        out = sdpa(q, k, v, attn_mask=causal, dropout_p=dropout)
    return attn.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _feed_forward(dim: int, mult: int, bias: bool) -> FeedForward:
    """Exact-GELU feed-forward, optionally without biases (Perceiver AR has none in its MLPs)."""
    ff = FeedForward(dim, mult, "gelu")
    if not bias:
        ff.fc1.bias = None
        ff.fc2.bias = None
    return ff


class CausalCrossAttention(nn.Module):
    """Latents ``[B, N, C]`` attend ``[prefix, latents]`` causally, then an MLP; both pre-norm with residuals.

    The prefix is normalised by ``norm_kv``, the latents (as queries and as keys) by ``norm_q``.
    """

    def __init__(self, dim: int, *, num_heads: int, widening_factor: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, num_heads=num_heads, qkv_bias=False, out_bias=True, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _feed_forward(dim, widening_factor, bias=False)

    def forward(self, h: Tensor, num_latents: int, angles: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """``h [B, K, C]`` (the prefix, then ``num_latents`` latents) → latents ``[B, N, C]``; ``angles`` and
        ``keep`` cover the K keys (the last N are the latents', which turn the queries too).

        The prefix rows are normalised by ``norm_kv`` and the latents by ``norm_q``, written over their rows of one
        ``[B, K, C]`` tensor: no tensor is as long as the prefix, so a traced ``K`` exports down to ``K = N``.
        """
        k_len = h.shape[1]
        rows = torch.arange(k_len - num_latents, k_len, device=h.device)  # the latents' [N]
        latents = h.index_select(1, rows)
        q = self.norm_q(latents)
        normed = self.norm_kv(h).index_copy_(1, rows, q)  # [B, K, C] (LayerNorm's backward keeps no output)
        k, v = _keys_values(self.attn, normed, angles)
        x = latents + _attention(self.attn, q, k, v, None if angles is None else angles.index_select(-2, rows), keep)
        return x + self.mlp(self.norm_mlp(x))

    def prefix_keys(self, prefix: Tensor, angles: Tensor | None) -> KeyValue:
        """Keys/values ``[B, H, P, d]`` of prefix positions ``[B, P, C]`` (for :meth:`extend`)."""
        return _keys_values(self.attn, self.norm_kv(prefix), angles)

    def extend(self, latents: Tensor, past: KeyValue | None, angles: Tensor | None,
               keep: Tensor | None) -> tuple[Tensor, KeyValue]:
        """Latents ``[B, t, C]`` (the last t positions) attend the keys ``past`` (earlier positions) and their own.

        ``angles`` turn the new latents' queries and keys. Returns the output ``[B, t, C]`` and the keys
        and values of all positions (``past`` followed by the new latents').
        """
        q = self.norm_q(latents)
        k, v = _append(past, _keys_values(self.attn, q, angles))
        x = latents + _attention(self.attn, q, k, v, angles, keep)
        return x + self.mlp(self.norm_mlp(x)), (k, v)


class CausalSelfAttention(nn.Module):
    """``x = x + CausalAttn(LN(x))``, ``x = x + MLP(LN(x))`` over ``[B, N, C]``; no biases anywhere."""

    def __init__(self, dim: int, *, num_heads: int, widening_factor: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, num_heads=num_heads, qkv_bias=False, out_bias=False, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _feed_forward(dim, widening_factor, bias=False)

    def forward(self, x: Tensor, angles: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """``[B, N, C]`` (optional rotary angles ``[N, r]``, mask ``[B, 1, N, N]``) → ``[B, N, C]``."""
        return self.extend(x, None, angles, keep)[0]

    def extend(self, x: Tensor, past: KeyValue | None, angles: Tensor | None,
               keep: Tensor | None) -> tuple[Tensor, KeyValue]:
        """New positions ``[B, t, C]`` attend ``past`` keys/values and their own → (``[B, t, C]``, all keys/values)."""
        h = self.norm(x)
        k, v = _append(past, _keys_values(self.attn, h, angles))
        x = x + _attention(self.attn, h, k, v, angles, keep)
        return x + self.mlp(self.norm_mlp(x)), (k, v)


@configurable
class TokenInputAdapter(nn.Module):
    """Token ids ``[B, L]`` → token embedding + learned absolute position ``[B, L, num_channels]``."""

    def __init__(self, vocab_size: int, max_seq_len: int, num_channels: int) -> None:
        super().__init__()
        self.vocab_size, self.max_seq_len, self.num_channels = vocab_size, max_seq_len, num_channels
        self.token_embedding = nn.Embedding(vocab_size, num_channels)
        self.pos_embedding = nn.Parameter(torch.zeros(max_seq_len, num_channels))

    def check(self, ids: Tensor, *, limit_length: bool = True) -> None:
        """Raise unless ``ids`` is a non-empty ``[B, L]`` tensor of valid token ids on this module's device,
        with ``L ≤ max_seq_len`` (when ``limit_length``)."""
        check_token_ids(ids, name="ids", num_tokens=self.vocab_size,
                        max_seq_len=self.max_seq_len if limit_length else None, module=self)

    def embed(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """Checked ``ids [B, L ≤ max_seq_len]`` → ``[B, L, num_channels]``.

        ``positions`` (``[L]`` or ``[B, L]``, values below ``max_seq_len``) pick the position
        embeddings; default ``0 … L - 1``.
        """
        pos = self.pos_embedding[: ids.shape[1]] if positions is None else self.pos_embedding[positions]
        return self.token_embedding(ids) + pos

    def forward(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """``ids [B, L]`` (optional ``positions [B, L]``) → ``[B, L, num_channels]``."""
        self.check(ids)
        return self.embed(ids, positions)


def check_pad_mask(pad_mask: Tensor, ids: Tensor) -> None:
    """Raise unless ``pad_mask`` is a bool ``[B, L]`` left-padding mask (True = padding) for ``ids [B, L, …]``.

    Left padding: in each row the padded positions come first, and at least one position is real (these
    two read the values, and are skipped while compiling or exporting).
    """
    if not isinstance(pad_mask, Tensor) or pad_mask.dtype != torch.bool:
        got = f"dtype {pad_mask.dtype}" if isinstance(pad_mask, Tensor) else type(pad_mask).__name__
        raise TypeError(f"pad_mask must be a bool tensor (True = padding), got {got}")
    if pad_mask.shape != ids.shape[:2]:
        raise ValueError(f"pad_mask must have shape {tuple(ids.shape[:2])} ([batch, seq_len] of the input), "
                         f"got {tuple(pad_mask.shape)}")
    if pad_mask.device != ids.device:
        raise ValueError(f"pad_mask is on {pad_mask.device}, the input on {ids.device}")
    if not data_dependent_checks():  # the value checks below would break a compiled or exported graph
        return
    not_left = (pad_mask[:, 1:] & ~pad_mask[:, :-1]).any(dim=1)
    if not_left.any():
        rows = not_left.nonzero()[:, 0].tolist()
        raise ValueError(f"pad_mask must pad on the left only (padding before a row's first real token); "
                         f"rows {rows[:8]} have padding after a real token")
    if pad_mask.all(dim=1).any():
        raise ValueError(f"pad_mask pads every position of rows {pad_mask.all(dim=1).nonzero()[:, 0].tolist()[:8]}")


def pad_positions(pad_mask: Tensor) -> Tensor:
    """Left-padding mask ``[B, L]`` → positions ``[B, L]`` counted from each row's first real token (padding: 0)."""
    shift = pad_mask.sum(dim=1, keepdim=True)
    return (torch.arange(pad_mask.shape[1], device=pad_mask.device) - shift).clamp(min=0)


class _DecodeCache:
    """Keys/values that stay valid from one ``generate`` step to the next (see ``_next_logits``)."""

    def __init__(self) -> None:
        self.length = 0  # tokens the cache covers
        self.latent_kv: list[KeyValue] | None = None  # all-latent phase: cross-attention, then each self-attention
        self.prefix_kv: KeyValue | None = None  # prefix phase: the cross-attention's prefix keys/values
        self.prefix_len = 0


@configurable
class PerceiverAR(nn.Module):
    """Generic Perceiver AR: ``input_adapter`` → causal cross-attention → causal self-attention → ``output_layer``.

    Args:
        input_adapter: maps the input ``[B, L, …]`` to ``[B, L, C]`` (absolute positions included); it
            must expose ``num_channels`` (C).
        output_layer: maps latents ``[B, N, C]`` to the output (usually logits).
        num_latents: N, the number of last positions that are latents (and get outputs).
        num_heads: heads of every attention (C must divide by it).
        num_self_attention_layers: causal self-attention layers over the latents.
        num_self_attention_rotary_layers: how many of them (the first ones) rotate queries/keys, -1 = all
            (krasserm's meaning); the cross-attention always does.
        rotated_channels_per_head: rotary channels of each head's queries/keys (even; 0 = none);
            default half of each head's channels (krasserm's choice with absolute positions on).
        cross_attention_widening_factor, self_attention_widening_factor: MLP hidden width / C.
        cross_attention_dropout: share of the prefix positions dropped in training
            (``int(P · p)`` of the ``P`` prefix positions, chosen uniformly per sample).
        post_attention_dropout: dropout on the attention probabilities (training only).
        init_scale: standard deviation of the initial linear, embedding and position weights.
        activation_checkpointing: recompute each attention layer in the backward pass.
        activation_offloading: with checkpointing, keep the saved layer inputs in CPU memory.

    ``forward(x, pad_mask=None)`` → ``output_layer`` of the latents, e.g. logits ``[B, N, vocab]`` for the
    last N positions; ``pad_mask [B, L]`` (True = padding) marks left padding.
    """

    def __init__(
        self,
        input_adapter: nn.Module,
        output_layer: nn.Module,
        *,
        num_latents: int,
        num_heads: int = 8,
        num_self_attention_layers: int = 6,
        num_self_attention_rotary_layers: int = 1,
        rotated_channels_per_head: int | None = None,
        cross_attention_widening_factor: int = 4,
        self_attention_widening_factor: int = 4,
        cross_attention_dropout: float = 0.5,
        post_attention_dropout: float = 0.0,
        init_scale: float = 0.02,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ) -> None:
        super().__init__()
        dim = getattr(input_adapter, "num_channels", None)
        if not isinstance(dim, int):
            raise TypeError(f"input_adapter must expose num_channels (an int), got {type(input_adapter).__name__}")
        check_count(num_latents=num_latents, num_heads=num_heads)
        check_count(minimum=0, num_self_attention_layers=num_self_attention_layers)
        if dim % num_heads:
            raise ValueError(f"num_channels={dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= cross_attention_dropout < 1.0:
            raise ValueError(f"cross_attention_dropout must lie in [0, 1), got {cross_attention_dropout}")
        if num_self_attention_rotary_layers < -1:
            raise ValueError("num_self_attention_rotary_layers must be >= 0 or -1 (every layer), "
                             f"got {num_self_attention_rotary_layers}")
        if num_self_attention_rotary_layers == -1:
            num_self_attention_rotary_layers = num_self_attention_layers
        head_width = dim // num_heads
        if rotated_channels_per_head is None:
            rotated_channels_per_head = head_width // 2
        if rotated_channels_per_head % 2 or not 0 <= rotated_channels_per_head <= head_width:
            raise ValueError(f"rotated_channels_per_head must be even and in [0, {head_width}] (the head width), "
                             f"got {rotated_channels_per_head}")
        self.num_latents = num_latents
        self.num_channels = dim
        self.num_self_attention_rotary_layers = num_self_attention_rotary_layers
        self.cross_attention_dropout = cross_attention_dropout
        self.activation_checkpointing = activation_checkpointing
        self.activation_offloading = activation_offloading
        self.input_adapter = input_adapter
        self.rotary = RotaryEmbedding(rotated_channels_per_head)
        self.cross_attention = CausalCrossAttention(
            dim, num_heads=num_heads, widening_factor=cross_attention_widening_factor, dropout=post_attention_dropout)
        self.self_attention = nn.ModuleList(
            CausalSelfAttention(dim, num_heads=num_heads, widening_factor=self_attention_widening_factor,
                                dropout=post_attention_dropout)
            for _ in range(num_self_attention_layers)
        )
        self.output_layer = output_layer
        self._init_parameters(init_scale)

    @torch.no_grad()
    def _init_parameters(self, init_scale: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, init_scale)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, init_scale)
        pos = getattr(self.input_adapter, "pos_embedding", None)
        if isinstance(pos, nn.Parameter):
            pos.normal_(0.0, init_scale)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """``x`` (as the input adapter takes it, sequence length L ≥ num_latents) → output for the last N positions.

        ``pad_mask [B, L]`` (bool, True = padding) marks left padding: padded positions are never
        attended, and positions (absolute and rotary) count from each row's first real token. The
        input adapter is then called as ``input_adapter(x, positions=[B, L])``. Outputs at padded
        latents are meaningless.
        """
        positions = None
        if pad_mask is not None:
            check_pad_mask(pad_mask, x)
            positions = pad_positions(pad_mask)
            h = self.input_adapter(x, positions=positions)  # [B, L, C]
        else:
            h = self.input_adapter(x)  # [B, L, C]
        if h.shape[1] < self.num_latents:
            raise ValueError(f"sequence length {h.shape[1]} is shorter than num_latents={self.num_latents}")
        return self.output_layer(self._latents(h, pad_mask, positions))

    def _latents(self, h: Tensor, pad_mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Embedded ``h [B, L, C]`` → latents ``[B, N, C]`` after the last layer; a sequence shorter than
        ``num_latents`` is all latents. ``positions [B, L]`` (rotary) go with ``pad_mask``."""
        b, n, _ = h.shape
        # not min(): for a traced n, min(N, n) is a symbol of its own and n - min(N, n) never simplifies
        num_latents = self.num_latents if n >= self.num_latents else n  # noqa: FURB136
        p = n - num_latents
        if positions is None:
            positions = torch.arange(n, device=h.device)
        angles = _angles_for(self.rotary, positions)  # [L, r] or [B, 1, L, r]
        angles_q, angles_k = _last(angles, num_latents, -2), angles
        key_padding = pad_mask
        if self.training and self.cross_attention_dropout > 0.0 and p > 0:
            prefix, kept = self._drop_prefix(h[:, :p])  # [B, P', C], indices [B, P']
            kept_pos = kept if positions.ndim == 1 else positions.gather(1, kept)
            key_pos = torch.cat((kept_pos, positions[..., p:].expand(b, -1)), dim=1)  # [B, P' + N]
            angles_k = self.rotary(key_pos)[:, None]  # [B, 1, K, r]
            if pad_mask is not None:
                key_padding = torch.cat((pad_mask[:, :p].gather(1, kept), pad_mask[:, p:]), dim=1)
            h = torch.cat((prefix, h[:, p:]), dim=1)  # [B, P' + N, C]
        cross_keep = None if pad_mask is None else causal_keep_mask(num_latents, key_padding)
        self_keep = None if pad_mask is None else causal_keep_mask(num_latents, _last(pad_mask, num_latents, 1))
        with self._offload():
            latents = self._call(self.cross_attention, h, num_latents, angles_k, cross_keep)
            for i, layer in enumerate(self.self_attention):
                rotary = angles_q if i < self.num_self_attention_rotary_layers else None
                latents = self._call(layer, latents, rotary, self_keep)
        return latents

    def _drop_prefix(self, prefix: Tensor) -> tuple[Tensor, Tensor]:
        """Keep ``P - int(P · p)`` prefix positions per sample, in order: ``([B, P', C], indices [B, P'])``.

        Padding counts as a prefix position (krasserm's rule): a row may keep padding and lose real tokens.
        """
        b, p, _ = prefix.shape
        rand = torch.rand(b, p, device=prefix.device)
        num_keep = p - int(p * self.cross_attention_dropout)
        # krasserm's kept positions (a boolean top-k mask read row by row) as sorted top-k indices: the same
        # positions, without nonzero's data-dependent shape (which breaks a compiled graph)
        kept = rand.topk(num_keep, dim=-1).indices.sort(dim=-1).values  # [B, P']
        return prefix.gather(1, kept[..., None].expand(-1, -1, prefix.shape[-1])), kept

    def _call(self, layer: nn.Module, *args: Tensor | None) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def _offload(self):
        use = self.activation_checkpointing and self.activation_offloading and self.training and torch.is_grad_enabled()
        return torch.autograd.graph.save_on_cpu() if use else nullcontext()


@dataclass
class CausalLanguageModelConfig:
    """krasserm's ``CausalLanguageModelConfig`` (perceiver-io 0.6.0): the same fields and defaults.

    Two fields of 0.11.0, which a state dict does not record (set them as the krasserm model had them):
    ``num_self_attention_rotary_layers`` (the first self-attention layers that rotate; -1 = all) and
    ``cross_attention_widening_factor`` (``None`` = ``widening_factor``, 0.6.0's one factor for both).
    """

    vocab_size: int
    max_seq_len: int
    num_latents: int
    num_channels: int
    num_heads: int = 8
    num_self_attention_layers: int = 8
    widening_factor: int = 4
    cross_attention_dropout: float = 0.5
    post_attention_dropout: float = 0.0
    random_sequence_truncation: bool = False
    init_scale: float = 0.02
    activation_checkpointing: bool = False
    activation_offloading: bool = False
    num_self_attention_rotary_layers: int = 1
    cross_attention_widening_factor: int | None = None


def top_f(logits: Tensor, fraction: float = 0.1) -> Tensor:
    """Keep the ``int(fraction · V)`` largest of ``logits [B, V]``, set the others to ``-inf``."""
    k = int(fraction * logits.shape[-1])
    values, indices = torch.topk(logits, k)
    return torch.full_like(logits, float("-inf")).scatter_(1, indices, values)


@configurable
class CausalLanguageModel(PerceiverAR):
    """Perceiver AR language model: ids ``[B, L]`` (``num_latents ≤ L ≤ max_seq_len``) → logits ``[B, num_latents, vocab]``.

    Logits at latent ``i`` predict the token after position ``L - num_latents + i``. Rotary embeddings
    cover half of each head's query/key channels. Sequences of different lengths are batched with left
    padding and a ``pad_mask`` (True = padding), as in krasserm's later versions.
    """

    def __init__(self, config: CausalLanguageModelConfig) -> None:
        check_count(vocab_size=config.vocab_size, max_seq_len=config.max_seq_len, num_latents=config.num_latents,
                    num_channels=config.num_channels, num_heads=config.num_heads)
        if config.num_latents > config.max_seq_len:
            raise ValueError(f"num_latents={config.num_latents} must be <= max_seq_len={config.max_seq_len} (the "
                             "latents are the last num_latents positions of a sequence)")
        if config.random_sequence_truncation and config.max_seq_len < 16:
            raise ValueError(f"random_sequence_truncation needs max_seq_len >= 16, got {config.max_seq_len}")
        head_width = config.num_channels // config.num_heads
        if config.num_channels % config.num_heads == 0 and (head_width // 2) % 2:
            raise ValueError(f"half the head width ({config.num_channels} // {config.num_heads} // 2 = "
                             f"{head_width // 2}) is the rotary width and must be even")
        super().__init__(
            TokenInputAdapter(config.vocab_size, config.max_seq_len, config.num_channels),
            Linear(config.num_channels, config.vocab_size, bias=False),
            num_latents=config.num_latents,
            num_heads=config.num_heads,
            num_self_attention_layers=config.num_self_attention_layers,
            num_self_attention_rotary_layers=config.num_self_attention_rotary_layers,
            rotated_channels_per_head=head_width // 2,
            cross_attention_widening_factor=(config.widening_factor if config.cross_attention_widening_factor is None
                                             else config.cross_attention_widening_factor),
            self_attention_widening_factor=config.widening_factor,
            cross_attention_dropout=config.cross_attention_dropout,
            post_attention_dropout=config.post_attention_dropout,
            init_scale=config.init_scale,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
        )
        self.config = config

    top_f = staticmethod(top_f)  # krasserm's ``CausalLanguageModel.top_f``

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def forward(self, ids: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """``ids [B, L]`` int64/int32, ``num_latents ≤ L ≤ max_seq_len`` → logits ``[B, num_latents, vocab]``.

        ``pad_mask [B, L]`` (bool, True = padding) marks left padding: padded positions are never
        attended and positions count from each row's first real token, so a row gives the logits it
        gives unpadded (at its real positions; logits at padded latents are meaningless). In training
        with ``random_sequence_truncation``, only the last ``n ~ U{16 … max_seq_len}`` tokens are used
        (all latents when ``n < num_latents``); logits stay right-aligned with ``ids``.
        """
        self.input_adapter.check(ids)
        if pad_mask is not None:
            check_pad_mask(pad_mask, ids)
        if ids.shape[1] < self.num_latents:
            raise ValueError(f"sequence length {ids.shape[1]} is shorter than num_latents={self.num_latents}")
        ids, pad_mask = self._truncate(ids, pad_mask)
        positions = None if pad_mask is None else pad_positions(pad_mask)
        h = self.input_adapter.embed(ids, positions)
        return self.output_layer(self._latents(h, pad_mask, positions))

    def _truncate(self, ids: Tensor, pad_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """In training with ``random_sequence_truncation``, the last ``n ~ U{16 … max_seq_len}`` tokens (positions
        restart at the window's start); otherwise ``ids`` and ``pad_mask`` as they are."""
        if not (self.config.random_sequence_truncation and self.training):
            return ids, pad_mask
        n = int(torch.randint(16, self.max_seq_len + 1, (1,)))
        return ids[:, -n:], None if pad_mask is None else pad_mask[:, -n:]

    @torch.no_grad()
    def generate(self, num: int, prompt: Tensor, threshold: float = 0.9, temperature: float = 1.0, *,
                 pad_mask: Tensor | None = None, use_cache: bool = True,
                 return_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Sample ``num`` tokens after ``prompt [B, n]``: ``[B, num]``.

        Each step feeds the last ``max_seq_len`` tokens (a prompt shorter than ``num_latents`` is all
        latents), keeps the ``int((1 - threshold) · vocab)`` most likely next tokens (top-f) and samples
        from their softmax at ``temperature`` with ``torch.multinomial``. The same random stream as
        krasserm's ``generate``: with the same seed and weights, the same tokens.

        Args:
            pad_mask: ``[B, n]`` bool, True = padding, for left-padded prompts of different lengths;
                each row then gets the tokens it gets alone (greedy; sampling draws per batch).
            use_cache: reuse keys/values that stay valid between steps (exact: the same logits up to
                rounding as without; see docs/perceiver-ar.md for when they do). In training mode every step
                runs the training forward, dropouts and truncation included (krasserm's ``generate``), uncached.
            return_logits: also return each step's logits ``[B, num, vocab]`` (before top-f).
        """
        check_count(minimum=0, num=num)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
        if not (math.isfinite(temperature) and temperature > 0):  # NaN / inf sample from NaN probabilities
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if int((1 - threshold) * self.config.vocab_size) < 1:
            raise ValueError(f"threshold={threshold} keeps no token of vocab_size={self.config.vocab_size}")
        self.input_adapter.check(prompt, limit_length=False)
        if pad_mask is not None:
            check_pad_mask(pad_mask, prompt)
        # in training mode each step is the training forward (dropouts act, as in krasserm's generate): nothing
        # computed in one step stays valid for the next
        cache = _DecodeCache() if use_cache and not self.training else None
        result, steps = prompt, []
        for _ in range(num):
            logits = self._next_logits(result, pad_mask, cache)  # [B, V]
            probs = F.softmax(top_f(logits, fraction=1 - threshold) / temperature, dim=-1)
            result = torch.cat((result, torch.multinomial(probs, 1)), dim=-1)
            if pad_mask is not None:
                pad_mask = F.pad(pad_mask, (0, 1), value=False)
            if return_logits:
                steps.append(logits)
        tokens = result[:, prompt.shape[1] :]
        if return_logits:
            if not steps:  # the output layer of no position: the dtype a step's logits have (autocast's, say)
                empty = self.output_layer(prompt.new_zeros(prompt.shape[0], 0, self.num_channels,
                                                           dtype=self.output_layer.weight.dtype))
                return tokens, empty
            return tokens, torch.stack(steps, dim=1)
        return tokens

    def _next_logits(self, ids: Tensor, pad_mask: Tensor | None, cache: _DecodeCache | None) -> Tensor:
        """Logits ``[B, V]`` of the token after checked ``ids [B, n]``, as the forward of the last
        ``max_seq_len`` tokens gives them.

        With a ``cache`` the step reuses what the previous steps computed, where that is exact:
        while every position is a latent (``n ≤ num_latents``), the keys/values of all attention
        layers (causal: earlier positions never see later ones); then, while ``n ≤ max_seq_len``,
        the prefix keys/values of the cross-attention (a prefix position only ever sees its own
        embedding and fixed position). Beyond ``max_seq_len`` the window slides and every position
        changes, so each step is computed afresh.
        """
        n, window = ids.shape[1], self.max_seq_len
        if cache is None or n > window:
            ids, pad_mask = self._truncate(ids[:, -window:], None if pad_mask is None else pad_mask[:, -window:])
            positions = None if pad_mask is None else pad_positions(pad_mask)
            h = self.input_adapter.embed(ids, positions)  # the prompt was checked, samples are ids
            return self.output_layer(self._latents(h, pad_mask, positions)[:, -1])
        positions = torch.arange(n, device=ids.device) if pad_mask is None else pad_positions(pad_mask)
        if n <= self.num_latents:
            x = self._extend_all_latents(ids, pad_mask, positions, cache)
        else:
            x = self._latents_with_prefix_cache(ids, pad_mask, positions, cache)
        cache.length = n
        return self.output_layer(x[:, -1])

    def _extend_all_latents(self, ids: Tensor, pad_mask: Tensor | None, positions: Tensor,
                            cache: _DecodeCache) -> Tensor:
        """All ``n ≤ num_latents`` positions are latents: run the new ones, attending the cached keys."""
        start = cache.length if cache.latent_kv is not None else 0
        past = cache.latent_kv or [None] * (1 + len(self.self_attention))
        new_pos = positions[..., start:]
        angles = _angles_for(self.rotary, new_pos)
        keep = None if pad_mask is None else causal_keep_mask(ids.shape[1] - start, pad_mask)
        x, kv0 = self.cross_attention.extend(self.input_adapter.embed(ids[:, start:], new_pos), past[0], angles, keep)
        kv = [kv0]
        for i, layer in enumerate(self.self_attention):
            x, kv_i = layer.extend(x, past[i + 1], angles if i < self.num_self_attention_rotary_layers else None, keep)
            kv.append(kv_i)
        cache.latent_kv = kv
        return x

    def _latents_with_prefix_cache(self, ids: Tensor, pad_mask: Tensor | None, positions: Tensor,
                                   cache: _DecodeCache) -> Tensor:
        """``num_latents < n ≤ max_seq_len``: extend the cached prefix keys, then run the latents."""
        cache.latent_kv = None
        p = ids.shape[1] - self.num_latents
        if cache.prefix_len < p:
            new_pos = positions[..., cache.prefix_len : p]
            h = self.input_adapter.embed(ids[:, cache.prefix_len : p], new_pos)
            cache.prefix_kv = _append(cache.prefix_kv,
                                      self.cross_attention.prefix_keys(h, _angles_for(self.rotary, new_pos)))
            cache.prefix_len = p
        lat_pos = positions[..., p:]
        angles = _angles_for(self.rotary, lat_pos)
        cross_keep = None if pad_mask is None else causal_keep_mask(self.num_latents, pad_mask)
        self_keep = None if pad_mask is None else causal_keep_mask(self.num_latents, pad_mask[:, p:])
        x, _ = self.cross_attention.extend(self.input_adapter.embed(ids[:, p:], lat_pos), cache.prefix_kv, angles,
                                           cross_keep)
        for i, layer in enumerate(self.self_attention):
            x = layer(x, angles if i < self.num_self_attention_rotary_layers else None, self_keep)
        return x
