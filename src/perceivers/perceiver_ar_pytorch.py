"""lucidrains' Perceiver AR (PyPI ``perceiver-ar-pytorch`` 0.0.10) on perceivers: a drop-in replacement.

``from perceiver_ar_pytorch import PerceiverAR`` and
``from perceiver_ar_pytorch.autoregressive_wrapper import AutoregressiveWrapper`` become
``from perceivers.perceiver_ar_pytorch import PerceiverAR, AutoregressiveWrapper``: the same keyword
arguments and defaults, the same ``forward(x, prefix_mask=None, labels=None)`` (logits, or the loss when
``labels`` is given), the same state-dict keys (its checkpoints load with ``strict=True`` both ways), the
same parameter creation order (the same seed gives the same initial weights) and the same random calls
(``cross_attn_dropout`` and ``generate`` draw the same numbers, so a fixed seed gives the same tokens).

The model (Hawthorne et al. 2022, arXiv 2202.07765) as that package builds it:

* token + learned absolute position embeddings; the first ``cross_attn_seq_len`` positions are the
  *prefix*, the remaining ``n`` positions the *sequence* whose next tokens are predicted;
* ``perceive_depth`` prefix layers: the sequence attends the whole prefix and causally itself (keys
  ``[prefix; sequence]``, one shared key/value projection), a pre-norm feed-forward after each; in training
  ``cross_attn_dropout`` drops that fraction of the prefix keys per sample;
* ``depth`` causal self-attention layers over the sequence;
* rotary embeddings (rotate-half layout, on the first ``max(32, dim_head // 2)`` channels of every head,
  positions ``0 .. seq_len - 1``, the sequence right-aligned) on queries and keys of every layer.

Attention runs through ``scaled_dot_product_attention`` with boolean masks (True = attend); the reference
materialises the score matrix. Outputs agree within float rounding (see docs/perceiver-ar-pytorch.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from perceivers.configurable import configurable

from .layers.dense import Linear
from .layers.rotary import RotaryEmbedding, rotate
from .layers.sdpa import sdpa
from .models.common import check_token_ids
from .validation import check_index_range

__all__ = [
    "AutoregressiveWrapper",
    "CausalAttention",
    "CausalPrefixAttention",
    "PerceiverAR",
    "feed_forward",
    "top_k",
]


def feed_forward(dim: int, mult: float = 4, dropout: float = 0.0) -> nn.Sequential:
    """Pre-norm MLP ``LayerNorm → Linear(dim, dim·mult) → GELU → Dropout → Linear(·, dim)``, no biases.

    A ``Sequential`` so that the state-dict keys are the reference's (``0.*`` norm, ``1.weight``, ``4.weight``).
    """
    hidden = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        Linear(dim, hidden, bias=False),
        nn.GELU(),
        nn.Dropout(dropout),
        Linear(hidden, dim, bias=False),
    )


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[B, n, H·d]`` → ``[B, H, n, d]``, a view."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(groups: list[Tensor]) -> Tensor:
    """Attention outputs of consecutive head groups, ``[B, h, n, d]`` each → ``[B, n, H·d]``: the heads side by side
    in one copy. Unlike reshaping transposed heads (and like ``_heads``) it asks nothing of ``n``, so torch.export
    keeps a length ``n = L - P`` dynamic down to 1."""
    return torch.cat([head for group in groups for head in group.unbind(1)], dim=-1)


class CausalAttention(nn.Module):
    """Pre-norm causal self-attention over the sequence ``x [B, n, dim]`` (no biases).

    ``rotary_pos_emb`` ``[L, r]`` holds angles for positions ``0 .. L - 1``; the last ``n`` rotate
    queries and keys. ``dropout`` is on the attention probabilities (PerceiverAR builds these with 0, as the
    reference does).
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.dropout = dropout
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = Linear(dim, inner * 3, bias=False)
        self.to_out = Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, rotary_pos_emb: Tensor | None = None) -> Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))  # [B, H, n, d]
        if rotary_pos_emb is not None:
            angles = rotary_pos_emb[-x.shape[1]:]
            q, k = rotate(q, angles), rotate(k, angles)
        dropout = self.dropout if self.training else 0.0
        out = sdpa(q, k, v, is_causal=True, dropout_p=dropout, scale=self.scale)
        return self.to_out(_merge_heads([out]))


class CausalPrefixAttention(nn.Module):
    """The Perceiver AR cross-attention: the sequence ``x [B, n, dim]`` attends ``[prefix; x]``.

    Every query sees all (kept, unmasked) prefix keys and the sequence keys up to its own position. The
    prefix and the sequence have their own LayerNorms and share ``to_kv``.

    Args:
        max_heads_process: heads attended per SDPA call (a peak-memory knob of the reference, which
            materialises ``[B, heads, n, P + n]`` scores; SDPA rarely needs it, but it is honoured, and with
            attention dropout on CPU it makes the dropout masks the reference's).
        dropout: dropout on the attention probabilities (training only).
        cross_attn_dropout: fraction of prefix positions dropped per sample in training
            (``P - int(P · cross_attn_dropout)`` kept, chosen as the top-k of one ``uniform_`` draw
            ``[B, P]``, kept in their original order with their own rotary positions).
    """

    def __init__(
        self,
        *,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        max_heads_process: int = 2,
        dropout: float = 0.0,
        cross_attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        self.max_heads_process = max_heads_process
        self.dropout = dropout
        self.cross_attn_dropout = cross_attn_dropout
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.to_q = Linear(dim, inner, bias=False)
        self.to_kv = Linear(dim, inner * 2, bias=False)
        self.to_out = Linear(inner, dim)

    def forward(
        self, x: Tensor, context: Tensor, context_mask: Tensor | None = None, rotary_pos_emb: Tensor | None = None
    ) -> Tensor:
        """``x [B, n, dim]``, prefix ``context [B, P, dim]``; ``context_mask`` bool ``[B, P]`` or ``[B, P + n]``
        (True = attend; positions it does not cover are attended); ``rotary_pos_emb`` angles ``[P + n, r]``.
        Returns ``[B, n, dim]``."""
        batch, n = x.shape[:2]
        prefix_len = context.shape[1]
        k_angles = rotary_pos_emb  # [P + n, r], or [B, 1, P' + n, r] after prefix dropout
        seq_mask = None
        if context_mask is not None:
            context_mask, seq_mask = context_mask[:, :prefix_len], context_mask[:, prefix_len:]

        if self.training and self.cross_attn_dropout > 0:
            # the reference's random call: torch.zeros(B, P).uniform_() (torch.rand draws the same numbers)
            rand = torch.rand(batch, prefix_len, device=x.device)
            keep = prefix_len - int(prefix_len * self.cross_attn_dropout)
            kept = rand.topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, P'] in sequence order
            context = context.gather(1, kept[..., None].expand(-1, -1, context.shape[-1]))
            if context_mask is not None:
                context_mask = context_mask.gather(1, kept)
            if k_angles is not None:
                seq_angles = k_angles[prefix_len:].expand(batch, -1, -1)
                k_angles = torch.cat((k_angles[kept], seq_angles), dim=1)[:, None]
            prefix_len = keep

        x = self.norm(x)
        context = self.context_norm(context)
        q = _heads(self.to_q(x), self.heads)  # [B, H, n, d]
        k_x, v_x = self.to_kv(x).chunk(2, dim=-1)
        k_c, v_c = self.to_kv(context).chunk(2, dim=-1)
        k = _heads(torch.cat((k_c, k_x), dim=1), self.heads)  # [B, H, P + n, d]
        v = _heads(torch.cat((v_c, v_x), dim=1), self.heads)
        if rotary_pos_emb is not None:
            q, k = rotate(q, rotary_pos_emb[-n:]), rotate(k, k_angles)

        # query i sees keys 0 .. P + i: the whole prefix and the sequence causally
        mask = torch.ones(n, prefix_len + n, dtype=torch.bool, device=x.device).tril(prefix_len)
        if context_mask is not None or seq_mask is not None:
            prefix_part = context_mask if context_mask is not None else mask.new_ones(batch, prefix_len)
            seq_part = mask.new_ones(batch, n)
            if seq_mask is not None and seq_mask.shape[1]:
                seq_part = seq_mask
            mask = mask & torch.cat((prefix_part, seq_part), dim=1)[:, None, None, :]  # [B, 1, n, P + n]

        dropout = self.dropout if self.training else 0.0
        group = self.max_heads_process
        out = [
            sdpa(qg, kg, vg, attn_mask=mask, dropout_p=dropout, scale=self.scale)
            for qg, kg, vg in zip(q.split(group, 1), k.split(group, 1), v.split(group, 1))
        ]
        return self.to_out(_merge_heads(out))


@configurable
class PerceiverAR(nn.Module):
    """lucidrains' Perceiver AR (``perceiver_ar_pytorch.PerceiverAR`` 0.0.10), keyword for keyword.

    Args:
        num_tokens: vocabulary size.
        dim: model width.
        depth: causal self-attention layers after the prefix layers.
        max_seq_len: longest input (learned position embeddings of this length).
        cross_attn_seq_len: prefix length ``P``; inputs must be longer than ``P``, and ``P < max_seq_len``.
        dim_head: width per head; at least 32 (the rotary embedding turns ``max(32, dim_head // 2)`` channels).
        heads: attention heads.
        dropout: on the prefix layers' attention probabilities and in every feed-forward.
        cross_attn_dropout: fraction of the prefix dropped per sample in training.
        ff_mult: feed-forward hidden width over ``dim``.
        perceive_depth: prefix cross-attention layers.
        perceive_max_heads_process: heads per attention call in the prefix layers (memory knob).
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        dim: int,
        depth: int,
        max_seq_len: int,
        cross_attn_seq_len: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        cross_attn_dropout: float = 0.0,
        ff_mult: float = 4,
        perceive_depth: int = 1,
        perceive_max_heads_process: int = 2,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_tokens", num_tokens, 1), ("dim", dim, 1), ("depth", depth, 0), ("max_seq_len", max_seq_len, 1),
            ("cross_attn_seq_len", cross_attn_seq_len, 0), ("heads", heads, 1), ("perceive_depth", perceive_depth, 0),
            ("perceive_max_heads_process", perceive_max_heads_process, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if max_seq_len <= cross_attn_seq_len:
            raise ValueError(
                f"max_seq_len ({max_seq_len}) must be greater than cross_attn_seq_len ({cross_attn_seq_len}), "
                "the length of the prefix that is cross-attended"
            )
        rotated = max(32, dim_head // 2)
        if dim_head < rotated:
            raise ValueError(f"dim_head must be >= 32 (the rotary embedding turns {rotated} channels per head), "
                             f"got {dim_head}")
        for name, p in (("dropout", dropout), ("cross_attn_dropout", cross_attn_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {p}")
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.cross_attn_seq_len = cross_attn_seq_len

        # creation order as in the reference: the same seed gives the same initial weights
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.rotary_pos_emb = RotaryEmbedding(rotated, persistent=True)  # the reference's key rotary_pos_emb.inv_freq
        self.perceive_layers = nn.ModuleList(
            nn.ModuleList([
                CausalPrefixAttention(
                    dim=dim, dim_head=dim_head, heads=heads, max_heads_process=perceive_max_heads_process,
                    dropout=dropout, cross_attn_dropout=cross_attn_dropout,
                ),
                feed_forward(dim, mult=ff_mult, dropout=dropout),
            ])
            for _ in range(perceive_depth)
        )
        self.layers = nn.ModuleList(
            nn.ModuleList([
                CausalAttention(dim=dim, dim_head=dim_head, heads=heads),
                feed_forward(dim, mult=ff_mult, dropout=dropout),
            ])
            for _ in range(depth)
        )
        self.to_logits = Linear(dim, num_tokens, bias=False)

    def forward(self, x: Tensor, prefix_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Token ids ``x [B, L]`` with ``cross_attn_seq_len < L <= max_seq_len``.

        Args:
            prefix_mask: bool ``[B, cross_attn_seq_len]``, True = attend (masks prefix keys of the prefix
                layers); a ``[B, L]`` mask is accepted too (its sequence part masks the sequence keys of
                the prefix layers, as the reference does with a longer mask). As in the reference, a mask
                ``[B, n]`` shorter than that is padded with True (``generate`` can keep a prompt's mask).
            labels: token ids ``[B, L]``; positions after the prefix are the targets, id 0 is ignored (the
                prefix's labels are not read, so they may hold anything, e.g. -100).

        Returns:
            logits ``[B, L - cross_attn_seq_len, num_tokens]``, or with ``labels`` the mean cross-entropy.
        """
        check_token_ids(x, name="x", num_tokens=self.num_tokens, max_seq_len=self.max_seq_len, module=self)
        batch, seq_len = x.shape
        prefix_len = self.cross_attn_seq_len
        if seq_len <= prefix_len:
            raise ValueError(
                f"sequence length {seq_len} must be greater than cross_attn_seq_len={prefix_len} "
                f"(the first {prefix_len} tokens are the cross-attended prefix)"
            )
        if prefix_mask is not None:
            if not isinstance(prefix_mask, Tensor) or prefix_mask.dtype != torch.bool:
                got = f"dtype {prefix_mask.dtype}" if isinstance(prefix_mask, Tensor) else type(prefix_mask).__name__
                raise TypeError(f"prefix_mask must be a bool tensor (True = attend), got {got}")
            if prefix_mask.ndim != 2 or prefix_mask.shape[0] != batch or prefix_mask.shape[1] > seq_len:
                raise ValueError(
                    f"prefix_mask must have shape [{batch}, n] with n <= {seq_len}, the input's length (usually "
                    f"[{batch}, {prefix_len}] or [{batch}, {seq_len}]), got {tuple(prefix_mask.shape)}"
                )
            if prefix_mask.device != x.device:
                raise ValueError(f"prefix_mask is on {prefix_mask.device} but x is on {x.device}")
            # the reference pads a shorter mask with True: to the prefix, or past it to the whole input
            # (so generate can keep the prompt's mask while the window grows)
            width = prefix_mask.shape[1]
            if width != prefix_len:
                prefix_mask = F.pad(prefix_mask, (0, (prefix_len if width < prefix_len else seq_len) - width), value=True)
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
                got = f"dtype {labels.dtype}" if isinstance(labels, Tensor) else type(labels).__name__
                raise TypeError(f"labels must be token ids, an int64 (or int32) tensor, got {got}")
            if labels.shape != x.shape:
                raise ValueError(f"labels must have the shape of x {tuple(x.shape)}, got {tuple(labels.shape)}")
            # only the targets are read: the reference ignores the prefix's labels (any value, e.g. -100)
            check_index_range(labels[:, prefix_len:], self.num_tokens, "labels after the prefix (the targets)")

        positions = torch.arange(seq_len, device=x.device)
        h = self.token_emb(x) + self.pos_emb(positions)  # [B, L, dim]
        angles = self.rotary_pos_emb(torch.arange(seq_len, device=x.device))  # [L, r], float32
        prefix, h = h[:, :prefix_len], h[:, prefix_len:]  # [B, P, dim], [B, n, dim]
        for cross_attn, ff in self.perceive_layers:
            h = cross_attn(h, prefix, context_mask=prefix_mask, rotary_pos_emb=angles) + h
            h = ff(h) + h
        for attn, ff in self.layers:
            h = attn(h, rotary_pos_emb=angles) + h
            h = ff(h) + h
        logits = self.to_logits(h)  # [B, n, num_tokens]
        if labels is None:
            return logits
        targets = labels[:, prefix_len:].long()
        return F.cross_entropy(rearrange(logits, "b n c -> b c n"), targets, ignore_index=0)


def top_k(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Keep the ``int((1 - thres) · vocab)`` largest logits of ``[B, vocab]`` (at least one; the reference
    keeps none, and then fails, when that product is below 1), the others become ``-inf``."""
    k = max(int((1 - thres) * logits.shape[-1]), 1)
    values, indices = torch.topk(logits, k)
    return torch.full_like(logits, float("-inf")).scatter_(1, indices, values)


@configurable
class AutoregressiveWrapper(nn.Module):
    """lucidrains' ``AutoregressiveWrapper`` for :class:`PerceiverAR`: next-token loss and sampling.

    ``forward(x)`` returns the net's loss for inputs ``x[:, :-1]`` and labels ``x[:, 1:]``; state-dict
    keys are the net's under ``net.``. ``perceivers.save_pretrained`` saves it with its net.
    """

    def __init__(self, net: PerceiverAR, pad_value: int = 0) -> None:
        super().__init__()
        self.max_seq_len = net.max_seq_len
        self.pad_value = pad_value
        self.net = net

    @torch.no_grad()
    def generate(
        self,
        start_tokens: Tensor,
        seq_len: int,
        eos_token: int | None = None,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        **kwargs,
    ) -> Tensor:
        """Sample ``seq_len`` tokens after ``start_tokens [B, n]`` (``n > cross_attn_seq_len``).

        Each step feeds the last ``max_seq_len`` tokens (``kwargs`` go to the net), keeps the top
        ``1 - filter_thres`` fraction of the vocabulary, divides by ``temperature`` and draws one token
        with ``torch.multinomial``. With ``eos_token``, stops once every sample has generated it and
        replaces what follows each sample's first generated ``eos_token`` by ``pad_value``.
        Runs in eval mode and restores the previous mode. Returns ``[B, <= seq_len]``.
        """
        check_token_ids(start_tokens, name="start_tokens", num_tokens=self.net.num_tokens, max_seq_len=None,
                        module=self)
        if start_tokens.shape[1] <= self.net.cross_attn_seq_len:
            raise ValueError(
                f"start_tokens must be longer than cross_attn_seq_len={self.net.cross_attn_seq_len}, "
                f"got length {start_tokens.shape[1]}"
            )
        if not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
        if not (math.isfinite(temperature) and temperature > 0):  # NaN / inf sample from NaN probabilities
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not 0.0 <= filter_thres <= 1.0:
            raise ValueError(f"filter_thres must lie in [0, 1], got {filter_thres}")
        was_training = self.training
        self.eval()
        try:
            return self._sample(start_tokens, seq_len, eos_token, temperature, filter_thres, kwargs)
        finally:
            self.train(was_training)

    def _sample(self, out: Tensor, seq_len: int, eos_token: int | None, temperature: float, filter_thres: float,
                kwargs: dict) -> Tensor:
        start = out.shape[1]
        for _ in range(seq_len):
            logits = self.net(out[:, -self.max_seq_len:], **kwargs)[:, -1]  # [B, vocab]
            probs = F.softmax(top_k(logits, thres=filter_thres) / temperature, dim=-1)
            out = torch.cat((out, torch.multinomial(probs, 1)), dim=-1)
            if eos_token is not None:
                generated = out[:, start:]
                is_eos = generated == eos_token
                if is_eos.any(dim=-1).all():
                    after_eos = F.pad(is_eos, (1, -1)).cumsum(dim=-1) >= 1  # strictly after the first eos
                    return generated.masked_fill(after_eos, self.pad_value)
        return out[:, start:]

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        """Token ids ``x [B, L + 1]`` → the net's loss on inputs ``x[:, :-1]`` and labels ``x[:, 1:]``."""
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"x must be token ids of shape [batch, seq_len + 1], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        # the net sees x[:, :-1]: say its limits in lengths of x, the tensor given
        shortest, longest = self.net.cross_attn_seq_len + 2, self.max_seq_len + 1
        if not shortest <= x.shape[1] <= longest:
            raise ValueError(f"x must hold {shortest} to {longest} tokens (inputs x[:, :-1] longer than "
                             f"cross_attn_seq_len={self.net.cross_attn_seq_len}, at most max_seq_len={self.max_seq_len}, "
                             f"and the next token of each), got length {x.shape[1]}")
        return self.net(x[:, :-1], labels=x[:, 1:], **kwargs)
