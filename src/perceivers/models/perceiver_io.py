"""Perceiver IO (arXiv 2107.14795) and the byte/token language model, with perceiver-pytorch's API.

One encoder cross-attention, ``depth`` latent self-attention layers, one decoder cross-attention
from user-given queries. Drop-in replacements for ``perceiver_pytorch.PerceiverIO`` and
``PerceiverLM`` (0.11.0). Optionally a deeper decoder (``decoder_depth``, ``decoder_self_attends``):
see docs/decoders.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import (
    ContextStream,
    CrossAttentionBlock,
    SelfAttentionBlock,
    auto_chunk_size,
    check_chunk_size,
    check_mask,
    chunk_bounds,
    join_chunks,
    loop_chunk_size,
    loop_pays,
    loop_rows,
    loops,
)
from ..layers.attention import pt2_only_export
from ..layers.broadcast import per_sample
from ..layers.dense import Linear
from ..layers.stream import DEFAULT_CHUNK
from ..validation import check_count, check_finite, check_like
from .common import (
    AttentionResidual,
    LayerSchedule,
    check_input,
    check_token_ids,
    initial_latents,
    start_hiddens,
    tie_schedule,
)

__all__ = ["PerceiverIO", "PerceiverLM", "dropout_seq"]


def dropout_seq(data: Tensor, mask: Tensor | None, prob: float) -> tuple[Tensor, Tensor | None]:
    """Keep a random ``1 - prob`` share of the input tokens (structured dropout, Perceiver AR).

    ``data [B, M, C]`` → ``[B, k, C]`` with ``k = max(1, int((1 - prob) · M))``; masked-out tokens are
    dropped first, and the returned mask keeps ``ceil(valid · (1 - prob))`` tokens per sample.
    """
    b, m = data.shape[:2]
    logits = torch.randn(b, m, device=data.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    keep_prob = 1.0 - prob
    num_keep = max(1, int(keep_prob * m))
    keep = logits.topk(num_keep, dim=1).indices  # [B, k]
    rows = torch.arange(b, device=data.device)[:, None]
    data = data[rows, keep]
    if mask is not None:
        keep_counts = torch.ceil(mask.sum(dim=-1) * keep_prob).int()
        mask = mask[rows, keep] & (torch.arange(num_keep, device=data.device) < keep_counts[:, None])
    return data, mask


def _check_decode_chunking(decode_chunk_size: int | None, self_attends: int) -> None:
    if self_attends and decode_chunk_size:
        raise ValueError(
            f"decode_chunk_size={decode_chunk_size} with decoder_self_attends={self_attends}: query self-attention "
            "lets every query attend every other, so decoding in independent chunks would change the outputs; "
            "use decode_chunk_size=None or 0 (the whole query set at once)"
        )


@configurable
class PerceiverIO(nn.Module):
    """Encode ``data [B, M, dim]`` into latents, decode them at ``queries``.

    Args:
        depth: latent self-attention layers after the single encoder cross-attention.
        dim: channels of ``data``.
        queries_dim: channels of the decoder queries.
        logits_dim: if set, a final ``Linear(queries_dim, logits_dim)``.
        num_latents, latent_dim: the latent array.
        cross_heads, cross_dim_head: heads and width per head of both cross-attentions.
        latent_heads, latent_dim_head: of the self-attentions.
        weight_tie_layers: all ``depth`` self-attention layers share one set of weights.
        decoder_ff: a pre-norm GEGLU feed-forward with a residual after the decoder cross-attention.
        seq_dropout_prob: structured input-token dropout in training (see :func:`dropout_seq`).
        attn_residual, attn_residual_rank: learned pool over earlier latent layers.
        inverted_cross_attn: slot-attention-style encoder cross-attention.
        chunk_size: stream inputs longer than this through the encoder cross-attention in chunks
            (``None``: as ``Perceiver``'s ``chunk_size``; ``0``: never); exact up to rounding.
        decode_chunk_size: decode query sets larger than this in independent chunks (``None``: above
            65536 queries, in chunks of 65536; ``0``: never). With ``decoder_self_attends`` the queries
            are not independent, so ``None`` decodes them whole and a positive size is refused.
        decoder_depth: query→latent cross-attention blocks in the decoder (default 1, perceiver-pytorch's).
            The first is ``decoder_cross_attn`` (no query residual); each further one is a residual
            block ``y = y + Attn(LN(y), LN(latents))`` (plus ``y = y + FF(LN(y))`` with ``decoder_ff``),
            in ``decoder_extra_cross_attns``.
        decoder_self_attends: query self-attention blocks (``latent_heads`` × ``latent_dim_head``, GEGLU
            feed-forward) after *each* decoder cross-attention (default 0), in ``decoder_self_attns``
            (``decoder_depth × decoder_self_attends`` blocks, in order). They let the outputs interact.

    Without ``queries`` the forward returns the latents ``[B, num_latents, latent_dim]`` and
    ``logits_dim`` does not apply (as in perceiver-pytorch).
    """

    def __init__(
        self,
        *,
        depth: int,
        dim: int,
        queries_dim: int,
        logits_dim: int | None = None,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        weight_tie_layers: bool = False,
        decoder_ff: bool = False,
        seq_dropout_prob: float = 0.0,
        attn_residual: bool = False,
        attn_residual_rank: int = 64,
        inverted_cross_attn: bool = False,
        chunk_size: int | None = None,
        decode_chunk_size: int | None = None,
        decoder_depth: int = 1,
        decoder_self_attends: int = 0,
    ) -> None:
        super().__init__()
        check_count(num_latents=num_latents, latent_dim=latent_dim, cross_heads=cross_heads, latent_heads=latent_heads,
                    cross_dim_head=cross_dim_head, latent_dim_head=latent_dim_head, decoder_depth=decoder_depth)
        check_count(decoder_self_attends=decoder_self_attends, minimum=0)
        self.decoder_depth, self.decoder_self_attends = decoder_depth, decoder_self_attends
        self.chunk_size = check_chunk_size(chunk_size)
        self.decode_chunk_size = check_chunk_size(decode_chunk_size, "decode_chunk_size")
        _check_decode_chunking(decode_chunk_size, decoder_self_attends)
        if not 0.0 <= seq_dropout_prob < 1.0:
            raise ValueError(f"seq_dropout_prob must be in [0, 1), got {seq_dropout_prob}")
        self.dim, self.queries_dim, self.latent_dim = dim, queries_dim, latent_dim
        self.seq_dropout_prob = seq_dropout_prob
        self.inverted_cross_attn = inverted_cross_attn
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.encoder_cross_attn = CrossAttentionBlock(
            latent_dim, dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head, qkv_bias=False,
            query_residual=True, mlp_mult=4, activation="geglu",
        )
        self.block_order = tie_schedule(depth, weight_tie_layers, tie_first=True)
        num_unique = max(self.block_order) + 1
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                latent_dim, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=False,
                mlp_mult=4, activation="geglu",
            )
            for _ in range(num_unique)
        )
        self.attn_residuals = (
            nn.ModuleList(AttentionResidual(latent_dim, attn_residual_rank) for _ in range(num_unique))
            if attn_residual
            else None
        )
        self.decoder_cross_attn = CrossAttentionBlock(
            queries_dim, latent_dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head,
            qkv_bias=False, query_residual=False, mlp_mult=4 if decoder_ff else None, activation="geglu",
        )
        self.to_logits = Linear(queries_dim, logits_dim) if logits_dim is not None else nn.Identity()
        # The deeper decoder (empty lists by default: no state-dict keys, no random numbers drawn, so
        # every module above is initialised as in a 1-layer decoder under the same seed).
        self.decoder_extra_cross_attns = nn.ModuleList(
            CrossAttentionBlock(
                queries_dim, latent_dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head,
                qkv_bias=False, query_residual=True, mlp_mult=4 if decoder_ff else None, activation="geglu",
            )
            for _ in range(decoder_depth - 1)
        )
        self.decoder_self_attns = nn.ModuleList(
            SelfAttentionBlock(
                queries_dim, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=False,
                mlp_mult=4, activation="geglu",
            )
            for _ in range(decoder_depth * decoder_self_attends)
        )

    def encode(self, data: Tensor, mask: Tensor | None = None, *, latents: Tensor | None = None) -> Tensor:
        """``data [B, M, dim]`` → latents after the encoder cross-attention ``[B, N, latent_dim]``.

        ``latents`` (``[N', latent_dim]`` or ``[B, N', latent_dim]``) replace the learned initial latents.
        """
        check_input(data, name="data", channels=self.dim, axes=1, module=self)
        mask = check_mask(mask, data.shape[0], data.shape[1], device=data.device)
        if self.training and self.seq_dropout_prob > 0.0:
            data, mask = dropout_seq(data, mask, self.seq_dropout_prob)
        x = initial_latents(self.latents, latents, data.shape[0], like=data)
        grad = torch.is_grad_enabled() and (data.requires_grad or any(p.requires_grad for p in self.parameters()))
        size = 0 if self.inverted_cross_attn else auto_chunk_size(data.shape[1], self.chunk_size, grad=grad)
        if not size and not self.inverted_cross_attn and loops(data.shape[1], self.chunk_size, grad=grad):
            size = self.chunk_size or DEFAULT_CHUNK  # a symbolic length (torch.export): a torch.while_loop over chunks
        if size:  # attend huge inputs chunk by chunk: no keys, values or scores of all of them at once
            return self.encoder_cross_attn(x, kv=ContextStream.from_tensor(data, size), mask=mask)
        return self.encoder_cross_attn(x, data, mask=mask, inverted=self.inverted_cross_attn)

    def decode(self, latents: Tensor, queries: Tensor, *, query_mask: Tensor | None = None) -> Tensor:
        """Queries ``[M, queries_dim]`` or ``[B, M, queries_dim]`` attend the latents → ``[B, M, out]``.

        ``query_mask [B, M]`` (bool, True = real query) hides padded queries from the query
        self-attention (``decoder_self_attends``); the cross-attentions treat each query on its own, so
        without query self-attention it changes nothing. Outputs at masked queries are computed like
        the others: ignore them.
        """
        if not isinstance(queries, Tensor) or not queries.is_floating_point():
            got = f"dtype {queries.dtype}" if isinstance(queries, Tensor) else type(queries).__name__
            raise TypeError(f"queries must be a floating-point tensor, got {got}")
        if queries.ndim not in (2, 3):
            raise ValueError(f"queries must be [m, queries_dim] or [batch, m, queries_dim], got {tuple(queries.shape)}")
        if queries.shape[-1] != self.queries_dim:
            raise ValueError(f"queries must have {self.queries_dim} channels, got {queries.shape[-1]}")
        check_like(queries, self, "queries")
        check_finite(queries, "queries")
        b = latents.shape[0]
        if queries.ndim == 2:
            queries = per_sample(queries, b)
        elif queries.shape[0] != b:
            raise ValueError(f"queries have batch size {queries.shape[0]} but data has {b}")
        query_mask = check_mask(query_mask, b, queries.shape[1], "query_mask", device=queries.device)
        _check_decode_chunking(self.decode_chunk_size, self.decoder_self_attends)
        size = auto_chunk_size(queries.shape[1], self.decode_chunk_size, grad=True)  # None: chunks of 65536
        if not size and not self.decoder_self_attends and self._decode_loops(queries, latents):
            return self._decode_looped(queries, latents)
        if not size or self.decoder_self_attends:  # query self-attention couples the queries: decode whole
            return self.to_logits(self._decode(queries, query_mask, latents=latents))
        # Very large query sets: the latents' keys/values once per block, then the queries in
        # independent chunks (each query's cross-attentions read only the latents and itself).
        kvs = [block.prepare(latents) for block in self._decoder_cross_blocks()]
        n = queries.shape[1]
        parts = (self.to_logits(self._decode(queries[:, a:z], None if query_mask is None else query_mask[:, a:z], kvs=kvs))
                 for a, z in chunk_bounds(n, size))
        return join_chunks(parts, n)

    def _decode_grad(self, queries: Tensor, latents: Tensor) -> bool:
        """Whether decoding records autograd."""
        return torch.is_grad_enabled() and (queries.requires_grad or latents.requires_grad
                                            or any(p.requires_grad for p in self.parameters()))

    def _decode_widths(self) -> tuple[int, int]:
        """(output channels, the widest other per-query intermediate: the attention's q (or folded: latent_dim per
        head), the GEGLU feed-forward's hidden layer)."""
        attn = self.decoder_cross_attn.attn
        return (getattr(self.to_logits, "out_features", self.queries_dim),
                max(attn.qk_channels, attn.v_channels, attn.num_heads * attn.kv_dim,
                    8 * self.queries_dim if self.decoder_cross_attn.mlp is not None else 0))

    def _decode_loops(self, queries: Tensor, latents: Tensor) -> bool:
        """Whether a symbolic query count is decoded in a ``torch.while_loop`` (without autograd, under
        ``torch.export``, unless ``decode_chunk_size`` is 0 or, outside ``fused_export``, the logits are as wide as
        half the widest per-query intermediate or attention scores: :func:`~perceivers.layers.loop_pays`)."""
        out, hidden = self._decode_widths()
        heads = self.decoder_cross_attn.attn.num_heads
        return (loops(queries.shape[1], self.decode_chunk_size, grad=self._decode_grad(queries, latents))
                and loop_pays(out, max(hidden, heads * latents.shape[1]), in_place=pt2_only_export()))

    def _decode_looped(self, queries: Tensor, latents: Tensor) -> Tensor:
        """A symbolic number of queries ``[B, M, queries_dim]`` (``torch.export`` with dynamic sizes) decoded in a
        ``torch.while_loop`` over chunks (:func:`~perceivers.layers.loop_rows`) against latents prepared once, as
        eager mode decodes large query sets: one chunk's intermediates at a time."""
        blocks = self._decoder_cross_blocks()
        size = loop_chunk_size(self.decode_chunk_size, max(self._decode_widths()))
        kvs = [block.prepare(latents, num_queries=size) for block in blocks]
        return loop_rows(lambda index: self.to_logits(self._decode(queries.index_select(1, index), None, kvs=kvs)),
                         queries.shape[1], size, device=latents.device, in_place=pt2_only_export())

    def _decoder_cross_blocks(self) -> list[CrossAttentionBlock]:
        return [self.decoder_cross_attn, *self.decoder_extra_cross_attns]

    def _decode(
        self, queries: Tensor, query_mask: Tensor | None, *, latents: Tensor | None = None, kvs: list | None = None
    ) -> Tensor:
        """The decoder stack on ``queries [B, M, queries_dim]`` → ``[B, M, queries_dim]`` (before ``to_logits``).

        Reads the latents, or per cross-attention block what its ``prepare`` returned (``kvs``).
        """
        x, per = queries, self.decoder_self_attends
        for i, cross in enumerate(self._decoder_cross_blocks()):
            x = cross(x, latents) if kvs is None else cross(x, kv=kvs[i])  # [B, M, queries_dim]
            for block in self.decoder_self_attns[i * per:(i + 1) * per]:
                x = block(x, mask=query_mask)  # padded queries are no keys
        return x

    @property
    def layers(self) -> LayerSchedule:
        """The latent self-attention block of each of the ``depth`` steps (tied steps share one object), a
        read-only ``ModuleList`` (perceiver-pytorch's ``layers``; here ``blocks`` and ``block_order``)."""
        return LayerSchedule(self.blocks, self.block_order)

    def forward(
        self,
        data: Tensor,
        mask: Tensor | None = None,
        queries: Tensor | None = None,
        block_outputs: Sequence[Tensor] | Tensor | None = None,
        return_hiddens: bool = False,
        *,
        latents: Tensor | None = None,
        query_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode ``data [B, M, dim]`` (``mask [B, M]``, True = attend) and decode at ``queries``.

        A sample whose mask has no True gets zeros from the encoder cross-attention (never NaN).
        ``latents`` (``[N', latent_dim]`` or ``[B, N', latent_dim]``) replace the learned initial latents.
        ``query_mask [B, m]`` (True = real query): see :meth:`decode`.

        Returns ``[B, m, logits_dim or queries_dim]``, or the latents when ``queries`` is None;
        with ``return_hiddens`` also the latents before and after each layer.
        """
        x = self.encode(data, mask, latents=latents)
        keep = return_hiddens or self.attn_residuals is not None or block_outputs is not None
        hiddens: list[Tensor] = []
        if keep:
            hiddens = start_hiddens(block_outputs, x)
        for unique in self.block_order:
            x = self.blocks[unique](x)
            if keep:
                hiddens.append(x)
            if self.attn_residuals is not None:
                x = self.attn_residuals[unique](hiddens)
        if queries is None and query_mask is not None:
            raise ValueError("query_mask needs queries: it marks which of the decoder queries are real")
        out = x if queries is None else self.decode(x, queries, query_mask=query_mask)
        return (out, hiddens) if return_hiddens else out


@configurable
class PerceiverLM(nn.Module):
    """Token model: embeddings + learned absolute positions, decoded at the inputs themselves.

    ``forward(x [B, n] long, mask [B, n])`` → logits ``[B, n, num_tokens]``. Not causal.
    Other keyword arguments go to :class:`PerceiverIO`.
    """

    def __init__(self, *, dim: int, num_tokens: int, max_seq_len: int, **kwargs) -> None:
        super().__init__()
        self.num_tokens, self.max_seq_len = num_tokens, max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.perceiver_io = PerceiverIO(dim=dim, queries_dim=dim, logits_dim=num_tokens, **kwargs)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        check_token_ids(x, name="x", num_tokens=self.num_tokens, max_seq_len=self.max_seq_len, module=self)
        h = self.token_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        # the queries are the inputs: padded ones are hidden from a query self-attention (if any)
        return self.perceiver_io(h, mask=mask, queries=h, query_mask=mask)
