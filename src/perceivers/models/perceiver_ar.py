"""Perceiver AR (Hawthorne et al. 2022, arXiv 2202.07765): an autoregressive Perceiver for long contexts.

The last ``num_latents`` positions of the embedded sequence are the latents. One causal
cross-attention lets them attend ``[prefix, latents]`` (in training a random share of the prefix is
dropped, ``cross_attention_dropout``), then causal self-attention layers work on the latents alone;
a final layer maps each latent to logits. Rotary embeddings turn part of every head's query/key
channels by the absolute position (right-aligned: latents sit at the end of the sequence) in the
cross-attention and the first ``num_self_attention_rotary_layers`` self-attention layers.

Matches krasserm's ``perceiver.model.core.PerceiverAR`` and ``perceiver.model.text.clm`` (perceiver-io
0.6.0) for the same weights (:func:`perceivers.convert.krasserm.from_krasserm_perceiver_ar`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..configurable import configurable
from ..layers import Attention, FeedForward
from ..layers.rotary import RotaryEmbedding, rotate
from .common import check_token_ids

__all__ = [
    "CausalCrossAttention",
    "CausalLanguageModel",
    "CausalLanguageModelConfig",
    "CausalSelfAttention",
    "PerceiverAR",
    "TokenInputAdapter",
    "top_f",
]


def _causal_attention(attn: Attention, x: Tensor, context: Tensor, angles_q: Tensor | None,
                      angles_k: Tensor | None) -> Tensor:
    """Causal attention of ``x [B, N, C]`` to ``context [B, K, C]`` (K ≥ N), right-aligned.

    Query ``i`` is the sequence position ``K - N + i`` of the context and attends keys ``0 … K - N + i``.
    Optional rotary angles ``[N, r]``/``[B, 1, N, r]`` for the queries and ``[K, r]``/``[B, 1, K, r]``
    for the keys.
    """
    q = rearrange(attn.to_q(x), "b n (h d) -> b h n d", h=attn.num_heads)
    k, v = attn.project_kv(context)  # [B, H, K, d]
    if angles_q is not None:
        q, k = rotate(q, angles_q), rotate(k, angles_k)
    n, m = q.shape[2], k.shape[2]
    dropout = attn.dropout if attn.training else 0.0
    if n == m:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    else:  # SDPA's is_causal aligns top-left; the latents are the last queries, so align bottom-right
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)
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

    def forward(self, latents: Tensor, prefix: Tensor, angles_q: Tensor | None = None,
                angles_k: Tensor | None = None) -> Tensor:
        """``latents [B, N, C]``, ``prefix [B, P, C]`` → ``[B, N, C]``; key angles cover ``P + N`` positions."""
        q = self.norm_q(latents)
        kv = torch.cat((self.norm_kv(prefix), q), dim=1)  # [B, P + N, C]
        x = latents + _causal_attention(self.attn, q, kv, angles_q, angles_k)
        return x + self.mlp(self.norm_mlp(x))


class CausalSelfAttention(nn.Module):
    """``x = x + CausalAttn(LN(x))``, ``x = x + MLP(LN(x))`` over ``[B, N, C]``; no biases anywhere."""

    def __init__(self, dim: int, *, num_heads: int, widening_factor: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, num_heads=num_heads, qkv_bias=False, out_bias=False, dropout=dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _feed_forward(dim, widening_factor, bias=False)

    def forward(self, x: Tensor, angles: Tensor | None = None) -> Tensor:
        """``[B, N, C]`` (optional rotary angles ``[N, r]``) → ``[B, N, C]``."""
        h = self.norm(x)
        x = x + _causal_attention(self.attn, h, h, angles, angles)
        return x + self.mlp(self.norm_mlp(x))


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

    def embed(self, ids: Tensor) -> Tensor:
        """Checked ``ids [B, L ≤ max_seq_len]`` → ``[B, L, num_channels]``."""
        return self.token_embedding(ids) + self.pos_embedding[: ids.shape[1]]

    def forward(self, ids: Tensor) -> Tensor:
        """``ids [B, L]`` → ``[B, L, num_channels]``."""
        self.check(ids)
        return self.embed(ids)


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
        num_self_attention_rotary_layers: how many of them (the first ones) rotate queries/keys; the
            cross-attention always does.
        rotated_channels_per_head: rotary channels of each head's queries/keys (even; 0 = none);
            default half of each head's channels (krasserm's choice with absolute positions on).
        cross_attention_widening_factor, self_attention_widening_factor: MLP hidden width / C.
        cross_attention_dropout: share of the prefix positions dropped in training
            (``int(P · p)`` of the ``P`` prefix positions, chosen uniformly per sample).
        post_attention_dropout: dropout on the attention probabilities (training only).
        init_scale: standard deviation of the initial linear, embedding and position weights.
        activation_checkpointing: recompute each attention layer in the backward pass.
        activation_offloading: with checkpointing, keep the saved layer inputs in CPU memory.

    ``forward(x)`` → ``output_layer`` of the latents, e.g. logits ``[B, N, vocab]`` for the last N positions.
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
        if dim % num_heads:
            raise ValueError(f"num_channels={dim} must be divisible by num_heads={num_heads}")
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        if not 0.0 <= cross_attention_dropout < 1.0:
            raise ValueError(f"cross_attention_dropout must lie in [0, 1), got {cross_attention_dropout}")
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

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (as the input adapter takes it, sequence length L ≥ num_latents) → output for the last N positions."""
        h = self.input_adapter(x)  # [B, L, C]
        if h.shape[1] < self.num_latents:
            raise ValueError(f"sequence length {h.shape[1]} is shorter than num_latents={self.num_latents}")
        return self._forward_embedded(h)

    def _forward_embedded(self, h: Tensor) -> Tensor:
        """Embedded ``h [B, L, C]`` → output; a sequence shorter than ``num_latents`` is all latents."""
        b, n, _ = h.shape
        num_latents = min(self.num_latents, n)
        prefix, latents = h[:, : n - num_latents], h[:, n - num_latents :]  # [B, P, C], [B, N, C]
        angles = self.rotary(torch.arange(n, device=h.device))  # [L, r]
        angles_q, angles_k = angles[n - num_latents :], angles
        if self.training and self.cross_attention_dropout > 0.0:
            prefix, kept = self._drop_prefix(prefix)  # [B, P', C], positions [B, P']
            angles_k = torch.cat((self.rotary(kept), angles_q.expand(b, -1, -1)), dim=1)[:, None]  # [B, 1, K, r]
        with self._offload():
            latents = self._call(self.cross_attention, latents, prefix, angles_q, angles_k)
            for i, layer in enumerate(self.self_attention):
                latents = self._call(layer, latents, angles_q if i < self.num_self_attention_rotary_layers else None)
        return self.output_layer(latents)

    def _drop_prefix(self, prefix: Tensor) -> tuple[Tensor, Tensor]:
        """Keep ``P - int(P · p)`` prefix positions per sample, in order: ``([B, P', C], positions [B, P'])``."""
        b, p, _ = prefix.shape
        rand = torch.rand(b, p, device=prefix.device)
        num_keep = p - int(p * self.cross_attention_dropout)
        keep = torch.zeros_like(rand, dtype=torch.bool).scatter_(1, rand.topk(num_keep, dim=-1).indices, True)
        kept = keep.nonzero()[:, 1].view(b, num_keep)  # row-major: sorted positions per sample
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
    """krasserm's ``CausalLanguageModelConfig`` (perceiver-io 0.6.0): the same fields and defaults."""

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


def top_f(logits: Tensor, fraction: float = 0.1) -> Tensor:
    """Keep the ``int(fraction · V)`` largest of ``logits [B, V]``, set the others to ``-inf``."""
    k = int(fraction * logits.shape[-1])
    values, indices = torch.topk(logits, k)
    return torch.full_like(logits, float("-inf")).scatter_(1, indices, values)


@configurable
class CausalLanguageModel(PerceiverAR):
    """Perceiver AR language model: ids ``[B, L]`` (``num_latents ≤ L ≤ max_seq_len``) → logits ``[B, num_latents, vocab]``.

    Logits at latent ``i`` predict the token after position ``L - num_latents + i``. Rotary embeddings
    cover half of each head's query/key channels. No padding mask (krasserm's 0.6.0 has none either):
    batch sequences of equal length.
    """

    def __init__(self, config: CausalLanguageModelConfig) -> None:
        if config.random_sequence_truncation and config.max_seq_len < 16:
            raise ValueError(f"random_sequence_truncation needs max_seq_len >= 16, got {config.max_seq_len}")
        head_width = config.num_channels // config.num_heads
        if config.num_channels % config.num_heads == 0 and (head_width // 2) % 2:
            raise ValueError(f"half the head width ({config.num_channels} // {config.num_heads} // 2 = "
                             f"{head_width // 2}) is the rotary width and must be even")
        super().__init__(
            TokenInputAdapter(config.vocab_size, config.max_seq_len, config.num_channels),
            nn.Linear(config.num_channels, config.vocab_size, bias=False),
            num_latents=config.num_latents,
            num_heads=config.num_heads,
            num_self_attention_layers=config.num_self_attention_layers,
            num_self_attention_rotary_layers=1,
            rotated_channels_per_head=head_width // 2,
            cross_attention_widening_factor=config.widening_factor,
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

    def forward(self, ids: Tensor) -> Tensor:
        """``ids [B, L]`` int64/int32, ``num_latents ≤ L ≤ max_seq_len`` → logits ``[B, num_latents, vocab]``.

        In training with ``random_sequence_truncation``, only the last ``n ~ U{16 … max_seq_len}``
        tokens are used (all latents when ``n < num_latents``); logits stay right-aligned with ``ids``.
        """
        self.input_adapter.check(ids)
        if ids.shape[1] < self.num_latents:
            raise ValueError(f"sequence length {ids.shape[1]} is shorter than num_latents={self.num_latents}")
        if self.config.random_sequence_truncation and self.training:
            n = int(torch.randint(16, self.max_seq_len + 1, (1,)))
            ids = ids[:, -n:]  # positions restart at the truncated window's start
        return self._forward_embedded(self.input_adapter.embed(ids))

    @torch.no_grad()
    def generate(self, num: int, prompt: Tensor, threshold: float = 0.9, temperature: float = 1.0) -> Tensor:
        """Sample ``num`` tokens after ``prompt [B, n]``: ``[B, num]``.

        Each step feeds the last ``max_seq_len`` tokens (a prompt shorter than ``num_latents`` is all
        latents), keeps the ``int((1 - threshold) · vocab)`` most likely next tokens (top-f) and samples
        from their softmax at ``temperature`` with ``torch.multinomial``. The same random stream as
        krasserm's ``generate``: with the same seed and weights, the same tokens.
        """
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if int((1 - threshold) * self.config.vocab_size) < 1:
            raise ValueError(f"threshold={threshold} keeps no token of vocab_size={self.config.vocab_size}")
        self.input_adapter.check(prompt, limit_length=False)
        result = prompt
        for _ in range(num):
            h = self.input_adapter.embed(result[:, -self.max_seq_len :])  # the prompt was checked, samples are ids
            logits = self._forward_embedded(h)[:, -1]  # [B, V]
            probs = F.softmax(top_f(logits, fraction=1 - threshold) / temperature, dim=-1)
            result = torch.cat((result, torch.multinomial(probs, 1)), dim=-1)
        return result[:, prompt.shape[1] :]
