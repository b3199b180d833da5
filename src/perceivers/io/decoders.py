"""Perceiver IO decoders: output queries cross-attend the latents.

Every decoder has two steps, as DeepMind's: ``decoder_query(inputs, ...)`` builds the queries
``[B, Q, query_channels]`` and ``forward(query, latents)`` decodes them. ``output_modality_sizes``
tells a multimodal postprocessor how to split the output rows.

The decoders that build on :class:`BasicDecoder` take the options of a deeper decoder
(``num_cross_attends``, ``num_self_attends_per_cross``, ``num_self_attention_heads``; see
docs/decoders.md). With query self-attention the queries are no longer independent:
:func:`couples_queries` tells, and callers that decode a subset of the queries refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..configurable import configurable
from ..layers import (
    Activation,
    ContextStream,
    CrossAttentionBlock,
    SelfAttentionBlock,
    TrainablePositionEncoding,
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
from ..layers.blocks import default_qk_channels
from ..layers.dense import Linear
from .processors.base import concat_rows, padder, restructure
from .queries import FourierQueries, InputQueries, TrainableQueries

__all__ = [
    "BasicDecoder",
    "ClassificationDecoder",
    "FlowDecoder",
    "MultimodalDecoder",
    "ProjectionDecoder",
    "VideoAutoencodingDecoder",
    "couples_queries",
]


def couples_queries(decoder: nn.Module | None) -> bool:
    """Whether ``decoder``'s outputs depend on the other queries (query self-attention), so that
    decoding a subset or chunk of the queries would change them."""
    return decoder is not None and any(
        isinstance(m, BasicDecoder) and m.num_self_attends_per_cross > 0 for m in decoder.modules()
    )


def _check_depth(num_cross_attends: object, num_self_attends_per_cross: object) -> None:
    for name, value, minimum in (("num_cross_attends", num_cross_attends, 1),
                                 ("num_self_attends_per_cross", num_self_attends_per_cross, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@configurable
class BasicDecoder(nn.Module):
    """Queries cross-attend the latents, then an optional final ``Linear`` (``output``).

    Args:
        queries: a query builder (:mod:`perceivers.io.queries`) or ``None`` when the queries come from
            elsewhere (the shared decoder of :class:`MultimodalDecoder`).
        query_channels: channels of the queries; taken from ``queries`` when given.
        latent_channels: D, channels of the latents.
        output_channels: width of the final ``Linear``; ``None`` for no final projection
            (DeepMind's ``final_project=False``), so the output has ``query_channels``.
        num_heads, qk_channels, v_channels: the cross-attention (q/k default to D, DeepMind's 'kv').
        cross_attention_shape_for_attn: the default q/k width: ``"kv"`` the latents' D, ``"q"`` the
            queries' width (transformers applies its config's setting to the decoders too).
        use_query_residual: add the queries to the attention output.
        widening_factor: MLP hidden width factor.
        concat_preprocessed_input: prepend the preprocessed inputs (without positions, with
            ``preprocessed_channels`` channels) to the built queries.
        zero_init_output: zero-initialise the final ``Linear`` (flow decoder).
        dropout: attention-weight and MLP dropout in training (0 in the official models).
        activation: MLP activation (official: tanh-approximated GELU).
        num_cross_attends: query→latent cross-attention layers (default 1, DeepMind's). The first is
            ``cross_attention``; each further one (``extra_cross_attentions``) is a residual block
            ``y = y + Attn(LN(y), LN(latents))``, ``y = y + MLP(LN(y))`` with the same widths.
        num_self_attends_per_cross: query self-attention layers (``self_attends``, biased q/k/v, MLP of
            ``widening_factor``) after *each* cross-attention (default 0). They let the outputs
            interact, so a subset of the queries no longer decodes as it would within the whole set.
        num_self_attention_heads: heads of those self-attentions (``None``: ``num_heads``); their q/k/v
            width is ``query_channels``, which must divide by it.

    ``chunk_size`` (a plain attribute, default ``None``): without query self-attention each query is decoded
    on its own, so large query sets (optical flow's one query per pixel, video autoencoding) are decoded in
    chunks against latents normalised and projected once, and only one chunk's intermediates (projections,
    MLP hidden layer) exist at a time. ``None``: above 32768 queries (with autograd above 65536), in chunks
    of at most ``2**21`` values of the widest intermediate over the batch (:func:`~perceivers.layers.auto_chunk_size`);
    ``0``: never; ``n > 0``: chunks of ``n``. With query self-attention the whole set is decoded at once.
    A symbolic query count (``torch.export`` with dynamic sizes, without autograd) is decoded in a
    ``torch.while_loop`` over chunks instead (:func:`~perceivers.layers.loop_rows`), each chunk's queries gathered
    by position (:attr:`~perceivers.layers.ContextStream.rows` of a streamed query set), unless ``chunk_size`` is 0
    or, outside :func:`~perceivers.layers.attention.fused_export`, the output (without a row-wise ``head``) is at
    least half as wide as the widest per-query intermediate (:func:`~perceivers.layers.loop_pays`).
    """

    def __init__(
        self,
        queries: nn.Module | None,
        *,
        latent_channels: int,
        query_channels: int | None = None,
        output_channels: int | None = None,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        use_query_residual: bool = False,
        widening_factor: int = 1,
        concat_preprocessed_input: bool = False,
        preprocessed_channels: int = 0,
        zero_init_output: bool = False,
        dropout: float = 0.0,
        activation: Activation = "gelu_tanh",
        num_cross_attends: int = 1,
        num_self_attends_per_cross: int = 0,
        num_self_attention_heads: int | None = None,
        cross_attention_shape_for_attn: Literal["kv", "q"] = "kv",
    ) -> None:
        super().__init__()
        _check_depth(num_cross_attends, num_self_attends_per_cross)
        if queries is not None:
            query_channels = queries.num_channels + (preprocessed_channels if concat_preprocessed_input else 0)
        if query_channels is None:
            raise ValueError("BasicDecoder needs a query builder or query_channels")
        self.queries = queries
        self.concat_preprocessed_input = concat_preprocessed_input
        self.query_channels, self.latent_channels = query_channels, latent_channels
        self.num_cross_attends, self.num_self_attends_per_cross = num_cross_attends, num_self_attends_per_cross

        default_qk = default_qk_channels(cross_attention_shape_for_attn, q_channels=query_channels,
                                         kv_channels=latent_channels)  # checks the setting even where unused
        cross_qk = default_qk if qk_channels is None else qk_channels

        def cross_attention(residual: bool) -> CrossAttentionBlock:
            return CrossAttentionBlock(
                query_channels, latent_channels, num_heads=num_heads, qk_channels=cross_qk, v_channels=v_channels,
                out_dim=query_channels, qkv_bias=True, query_residual=residual, mlp_mult=widening_factor,
                activation=activation, attn_dropout=dropout, ff_dropout=dropout,
            )

        self.cross_attention = cross_attention(use_query_residual)
        self.output = None if output_channels is None else Linear(query_channels, output_channels)
        if self.output is not None and zero_init_output:
            self.output._haiku_zero_init = True  # read by perceivers.io.init.init_like_haiku
            nn.init.zeros_(self.output.weight)
        self.output_channels = query_channels if output_channels is None else output_channels
        # The deeper decoder: empty by default (no state-dict keys, no random numbers drawn, so the
        # modules above are initialised as in DeepMind's 1-layer decoder under the same seed).
        self.extra_cross_attentions = nn.ModuleList(cross_attention(True) for _ in range(num_cross_attends - 1))
        heads = num_heads if num_self_attention_heads is None else num_self_attention_heads
        if num_self_attends_per_cross and query_channels % heads:
            raise ValueError(f"the query self-attention's width query_channels={query_channels} must be divisible by "
                             f"num_self_attention_heads={heads}")
        self.self_attends = nn.ModuleList(
            SelfAttentionBlock(
                query_channels, num_heads=heads, qkv_bias=True, mlp_mult=widening_factor, activation=activation,
                attn_dropout=dropout, ff_dropout=dropout,
            )
            for _ in range(num_cross_attends * num_self_attends_per_cross)
        )
        # the widest per-query intermediate: q/k/v projections (folded: the latents' width per head), MLP hidden
        # layer (GEGLU: twice), output
        attn = self.cross_attention.attn
        self._hidden_width = max(query_channels * widening_factor * (2 if activation == "geglu" else 1),
                                 attn.qk_channels, attn.v_channels, attn.num_heads * attn.kv_dim)
        self._query_width = max(self._hidden_width, self.output_channels)
        self.chunk_size: int | None = None

    @property
    def chunk_size(self) -> int | None:
        """Queries decoded per chunk (see the class docstring)."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        self._chunk_size = check_chunk_size(value)

    def _decode_chunk_size(self, query: Tensor | ContextStream, latents: Tensor) -> int:
        """Queries per chunk for ``query [B, Q, C]``, or 0 to decode them at once."""
        if (self.num_self_attends_per_cross or (torch.compiler.is_compiling() and not torch.compiler.is_exporting())
                or "forward" in self.cross_attention.attn.__dict__):
            # coupled queries decode whole; a compiled graph keeps one path; weights being recorded
            # (layers.attention.record_attention) are one [B, H, Q, N] per layer call. torch.export decodes a
            # fixed query count in chunks as eager mode does (the loop unrolls; a symbolic count decodes whole)
            return 0
        return auto_chunk_size(query.shape[1], self.chunk_size, grad=self._grad(query, latents),
                               channels=self._query_width, batch=query.shape[0], device=latents.device)

    def _loops(self, query: Tensor | ContextStream, latents: Tensor, head: Callable[[Tensor], Tensor] | None) -> bool:
        """Whether a symbolic query count is decoded in a ``torch.while_loop`` (see the class docstring): not for an
        output as wide as half the widest per-query intermediate or attention scores, outside ``fused_export``."""
        attn = self.cross_attention.attn
        return (not self.num_self_attends_per_cross and "forward" not in attn.__dict__
                and loops(query.shape[1], self.chunk_size, grad=self._grad(query, latents))
                and loop_pays(None if head is not None else self.output_channels,
                              max(self._hidden_width, attn.num_heads * latents.shape[1]), in_place=pt2_only_export()))

    def _grad(self, query: Tensor | ContextStream, latents: Tensor) -> bool:
        """Whether decoding records autograd (a stream's chunks may need gradients)."""
        return torch.is_grad_enabled() and (getattr(query, "requires_grad", True) or latents.requires_grad
                                            or any(p.requires_grad for p in self.parameters()))

    @property
    def num_queries(self) -> int | None:
        return None if self.queries is None else self.queries.num_queries

    def decoder_query(
        self,
        inputs: Tensor,
        *,
        modality_sizes: Mapping[str, int] | None = None,
        inputs_without_pos: Tensor | None = None,
        subsampled_points: Tensor | None = None,
        stream: bool = False,
        **kwargs,
    ) -> Tensor | ContextStream:
        """Build the queries ``[B, Q, query_channels]`` for the preprocessed ``inputs [B, M, C]``.

        ``stream=True``: Fourier and trainable queries come as a :class:`~perceivers.layers.ContextStream`, built
        chunk by chunk (or by position) as :meth:`forward` decodes them (input queries pass a streamed input through either way)."""
        if self.queries is None:
            raise ValueError("this decoder has no query builder; its queries come from elsewhere")
        if stream and isinstance(self.queries, (FourierQueries, TrainableQueries)) and not self.concat_preprocessed_input:
            kwargs["stream"] = True
        query = self.queries(inputs.shape[0], inputs=inputs, subsampled_points=subsampled_points, **kwargs)
        if self.concat_preprocessed_input:
            if inputs_without_pos is None:
                raise ValueError("concat_preprocessed_input needs inputs_without_pos")
            query = torch.cat([inputs_without_pos, query.to(inputs_without_pos.dtype)], dim=-1)
        return query

    def output_modality_sizes(self, subsampled_points=None) -> dict[str, int] | None:
        return None

    def forward(self, query: Tensor | ContextStream, latents: Tensor, *, query_mask: Tensor | None = None,
                head: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``query [B, Q, Cq]``, ``latents [B, N, D]``, ``query_mask [B, Q]`` (bool) → ``[B, Q, output_channels]``.

        Queries whose mask is False attend nothing: their attention output is zero before the
        output projection (DeepMind's behaviour at padded MLM positions). With query self-attention
        they are no keys either, so they do not change the other queries' outputs.

        ``query`` may be a :class:`~perceivers.layers.ContextStream` (optical flow's streamed tokens):
        decoded in chunks, each chunk of queries is built from it only when it is decoded.

        ``head``: a row-wise map ``[B, q, output_channels]`` → ``[B, q, K]`` applied to each decoded chunk
        (a :class:`~perceivers.io.processors.RowwisePostprocessor`'s ``rowwise``): the output is ``[B, Q, K]``
        and the ``output_channels``-wide one for the whole query set is never built.
        """
        query_mask = self._checked(query, latents, query_mask)
        size = self._decode_chunk_size(query, latents)
        if not size and self._loops(query, latents, head):
            return self._decode_looped(query, latents, query_mask, head)
        if not size:
            out = self._decode(query.materialize() if isinstance(query, ContextStream) else query, latents, query_mask)
            return out if head is None else head(out)
        return self._decode_in_chunks(query, latents, query_mask, size, self._prepare(latents, size), head)

    def _checked(self, query: Tensor | ContextStream, latents: Tensor, query_mask: Tensor | None) -> Tensor | None:
        """Check the widths of ``query`` and ``latents``; → the checked ``query_mask``."""
        for name, x, width in (("query", query, self.query_channels), ("latents", latents, self.latent_channels)):
            if len(x.shape) != 3 or x.shape[-1] != width:
                raise ValueError(f"decoder {name} must be [batch, n, {width}], got {tuple(x.shape)}")
        return check_mask(query_mask, query.shape[0], query.shape[1], "query_mask", device=latents.device)

    def _prepare(self, latents: Tensor, size: int) -> list:
        """What each cross-attention needs of the latents, made once for chunks of ``size`` queries."""
        return [block.prepare(latents, num_queries=size) for block in (self.cross_attention, *self.extra_cross_attentions)]

    def _decode_in_chunks(self, query: Tensor | ContextStream, latents: Tensor, query_mask: Tensor | None, size: int,
                          kvs: list, head: Callable[[Tensor], Tensor] | None) -> Tensor:
        """Independent queries decoded ``size`` at a time against the prepared latents ``kvs``."""
        n = query.shape[1]
        streamed = isinstance(query, ContextStream)
        rows = query.chunk if streamed else (lambda a, z: query[:, a:z])

        def part(a: int, z: int) -> Tensor:
            out = self._decode(rows(a, z), latents, None if query_mask is None else query_mask[:, a:z], kvs=kvs)
            return out if head is None else head(out)

        if self._grad(query, latents) and not torch.compiler.is_compiling():
            # with autograd only each chunk's output is kept: its intermediates (and a stream's queries) are
            # made again in the backward pass
            parts = (checkpoint(part, a, z, use_reentrant=False) for a, z in chunk_bounds(n, size))
        else:
            parts = (part(a, z) for a, z in chunk_bounds(n, size))
        return join_chunks(parts, n)

    def _decode_looped(self, query: Tensor | ContextStream, latents: Tensor, query_mask: Tensor | None,
                       head: Callable[[Tensor], Tensor] | None) -> Tensor:
        """A symbolic number of independent queries decoded in a ``torch.while_loop`` over chunks against latents
        prepared once, each chunk's queries gathered by position: a stream's ``rows`` (e.g. Fourier features of
        those points, image tokens of those pixels), else rows of the whole query array."""
        size = loop_chunk_size(self.chunk_size, self._query_width)
        kvs = self._prepare(latents, size)
        if isinstance(query, ContextStream):
            rows = query.rows or ContextStream.from_tensor(query.materialize()).rows
        else:
            rows = lambda index: query.index_select(1, index)

        def part(index: Tensor) -> Tensor:
            mask = None if query_mask is None else query_mask.index_select(1, index)
            out = self._decode(rows(index), latents, mask, kvs=kvs)
            return out if head is None else head(out)

        return loop_rows(part, query.shape[1], size, device=latents.device, in_place=pt2_only_export())

    def _decode(self, query: Tensor, latents: Tensor, query_mask: Tensor | None, *, kvs: list | None = None) -> Tensor:
        """The decoder stack on ``query [B, Q, Cq]`` against the latents, or (``kvs``) what each
        cross-attention's ``prepare`` made of them."""
        kv = (lambda i: {"kv": kvs[i]}) if kvs is not None else (lambda i: {"context": latents})
        out = self.cross_attention(query.to(latents.dtype), query_mask=query_mask, **kv(0))  # [B, Q, Cq]
        out = self._self_attend(out, 0, query_mask)
        for i, cross in enumerate(self.extra_cross_attentions, start=1):
            out = self._self_attend(cross(out, query_mask=query_mask, **kv(i)), i, query_mask)
        return out if self.output is None else self.output(out)

    def _self_attend(self, x: Tensor, layer: int, query_mask: Tensor | None) -> Tensor:
        """The query self-attentions after cross-attention ``layer`` (0-based); masked queries are no keys."""
        per = self.num_self_attends_per_cross
        for block in self.self_attends[layer * per:(layer + 1) * per]:
            x = block(x, mask=query_mask)
        return x


@configurable
class ClassificationDecoder(nn.Module):
    """One trainable query (``query_channels`` wide) → ``Linear`` to ``num_classes``: ``[B, num_classes]``.

    ``num_cross_attends``, ``num_self_attends_per_cross``, ``num_self_attention_heads``: as
    :class:`BasicDecoder` (a self-attention over the single query only mixes it with itself).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        latent_channels: int,
        query_channels: int | None = None,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        use_query_residual: bool = True,
        widening_factor: int = 1,
        dropout: float = 0.0,
        activation: Activation = "gelu_tanh",
        num_cross_attends: int = 1,
        num_self_attends_per_cross: int = 0,
        num_self_attention_heads: int | None = None,
    ) -> None:
        super().__init__()
        query_channels = latent_channels if query_channels is None else query_channels
        self.num_classes = num_classes
        self.decoder = BasicDecoder(
            TrainableQueries(1, query_channels), latent_channels=latent_channels, output_channels=num_classes,
            num_heads=num_heads, qk_channels=qk_channels, v_channels=v_channels,
            use_query_residual=use_query_residual, widening_factor=widening_factor, dropout=dropout,
            activation=activation, num_cross_attends=num_cross_attends,
            num_self_attends_per_cross=num_self_attends_per_cross, num_self_attention_heads=num_self_attention_heads,
        )
        self.query_channels = query_channels
        self.output_channels = num_classes

    def decoder_query(self, inputs: Tensor, **kwargs) -> Tensor:
        return self.decoder.decoder_query(inputs, **kwargs)

    def output_modality_sizes(self, subsampled_points=None) -> None:
        return None

    def forward(self, query: Tensor, latents: Tensor, *, query_mask: Tensor | None = None) -> Tensor:
        """→ logits ``[B, num_classes]`` (the output of query 0)."""
        return self.decoder(query, latents, query_mask=query_mask)[:, 0]


@configurable
class ProjectionDecoder(nn.Module):
    """No cross-attention: mean over the latents, then a zero-initialised ``Linear`` → ``[B, num_classes]``."""

    def __init__(self, num_classes: int, *, latent_channels: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.query_channels = 0
        self.output_channels = num_classes
        self.logits = Linear(latent_channels, num_classes)
        self.logits._haiku_zero_init = True
        nn.init.zeros_(self.logits.weight)
        nn.init.zeros_(self.logits.bias)

    def decoder_query(self, inputs: Tensor, **kwargs) -> None:
        return None

    def output_modality_sizes(self, subsampled_points=None) -> None:
        return None

    def forward(self, query: Tensor | None, latents: Tensor, *, query_mask: Tensor | None = None) -> Tensor:
        return self.logits(latents.mean(dim=1))


@configurable
class FlowDecoder(nn.Module):
    """Optical flow: the preprocessed inputs are the queries (one per pixel) → ``[B, H, W, 2]``.

    The final ``Linear`` output is divided by ``rescale_factor`` (100 in the official model). The
    result is in the units of transformers' ``PerceiverForOpticalFlow``; the official colab then
    multiplies by 20 (``FLOW_SCALE_FACTOR``) to get pixels — done by the task model, not here.
    ``num_cross_attends``, ``num_self_attends_per_cross``, ``num_self_attention_heads``, ``dropout``: as
    :class:`BasicDecoder` (query self-attention over all pixels costs memory quadratic in their number).
    """

    def __init__(
        self,
        *,
        query_channels: int,
        latent_channels: int,
        output_image_shape: Sequence[int],
        output_channels: int = 2,
        rescale_factor: float = 100.0,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        use_query_residual: bool = False,
        widening_factor: int = 1,
        activation: Activation = "gelu_tanh",
        num_cross_attends: int = 1,
        num_self_attends_per_cross: int = 0,
        num_self_attention_heads: int | None = None,
        cross_attention_shape_for_attn: Literal["kv", "q"] = "kv",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.output_image_shape = tuple(int(n) for n in output_image_shape)
        self.rescale_factor = float(rescale_factor)
        self.decoder = BasicDecoder(
            InputQueries(query_channels), latent_channels=latent_channels, output_channels=output_channels,
            num_heads=num_heads, qk_channels=qk_channels, v_channels=v_channels,
            use_query_residual=use_query_residual, widening_factor=widening_factor, zero_init_output=True,
            activation=activation, num_cross_attends=num_cross_attends,
            num_self_attends_per_cross=num_self_attends_per_cross, num_self_attention_heads=num_self_attention_heads,
            cross_attention_shape_for_attn=cross_attention_shape_for_attn, dropout=dropout,
        )
        self.query_channels, self.output_channels = query_channels, output_channels

    def decoder_query(self, inputs: Tensor, **kwargs) -> Tensor:
        return self.decoder.decoder_query(inputs, **kwargs)

    def output_modality_sizes(self, subsampled_points=None) -> None:
        return None

    def forward(self, query: Tensor, latents: Tensor, *, query_mask: Tensor | None = None) -> Tensor:
        """→ ``[B, H, W, output_channels]`` (the query rows are the pixels, row-major)."""
        out = self.decoder(query, latents, query_mask=query_mask) / self.rescale_factor
        b, q, c = out.shape
        h, w = self.output_image_shape
        if q != h * w:
            raise ValueError(f"flow decoder expected {h}x{w}={h * w} queries, got {q}")
        return out.reshape(b, h, w, c)


@configurable
class VideoAutoencodingDecoder(nn.Module):
    """Fourier queries over the full output grid ``(T, H, W)``; outputs ``[B, T, H, W, C]``, or ``[B, Q, C]``
    in the order of the points when ``subsampled_points`` are given to ``forward`` (as
    :class:`PerceiverIOModel` does with its ``subsampled_output_points``), even if they cover the whole
    grid. ``num_cross_attends``, ``num_self_attends_per_cross``, ``num_self_attention_heads``, ``dropout``: as
    :class:`BasicDecoder`."""

    def __init__(
        self,
        output_shape: Sequence[int],
        *,
        latent_channels: int,
        output_channels: int,
        num_bands: int,
        max_resolution: Sequence[float] | None = None,
        num_heads: int = 1,
        use_query_residual: bool = False,
        concat_pos: bool = True,
        sine_only: bool = False,
        activation: Activation = "gelu_tanh",
        num_cross_attends: int = 1,
        num_self_attends_per_cross: int = 0,
        num_self_attention_heads: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(output_shape) != 3:
            raise ValueError(f"output_shape must be (T, H, W), got {tuple(output_shape)}")
        self.output_shape = tuple(int(n) for n in output_shape)
        queries = FourierQueries(self.output_shape, num_bands, max_resolution, concat_pos=concat_pos,
                                 sine_only=sine_only)
        self.decoder = BasicDecoder(
            queries, latent_channels=latent_channels, output_channels=output_channels, num_heads=num_heads,
            use_query_residual=use_query_residual, activation=activation, num_cross_attends=num_cross_attends,
            num_self_attends_per_cross=num_self_attends_per_cross, num_self_attention_heads=num_self_attention_heads,
            dropout=dropout,
        )
        self.query_channels, self.output_channels = queries.num_channels, output_channels

    @property
    def queries(self) -> FourierQueries:
        return self.decoder.queries

    def decoder_query(self, inputs: Tensor, **kwargs) -> Tensor:
        return self.decoder.decoder_query(inputs, **kwargs)

    def output_modality_sizes(self, subsampled_points=None) -> None:
        return None

    def forward(
        self, query: Tensor, latents: Tensor, *, query_mask: Tensor | None = None,
        subsampled_points: Tensor | None = None,
    ) -> Tensor:
        """→ ``[B, T, H, W, C]`` for the full query grid; ``[B, Q, C]`` when the queries were built from
        ``subsampled_points`` (pass the same points here: a reordering of all the points is no grid)."""
        out = self.decoder(query, latents, query_mask=query_mask)
        if subsampled_points is None and out.shape[1] == self.decoder.queries.num_queries:
            return out.reshape(out.shape[0], *self.output_shape, out.shape[-1])
        return out


@configurable
class MultimodalDecoder(nn.Module):
    """Per-modality queries, padded with learned vectors to a common width, decoded by one shared decoder.

    Args:
        queries: modality name → query builder (each with ``num_channels`` and ``num_queries``).
        latent_channels: D.
        output_channels: width of the shared decoder's final ``Linear``.
        min_padding_size: every modality gets at least this many learned padding channels; the
            common width is ``max(query channels) + min_padding_size``.
        num_heads, qk_channels, v_channels, use_query_residual: the shared cross-attention.
        num_cross_attends, num_self_attends_per_cross, num_self_attention_heads: the shared decoder's
            depth, as :class:`BasicDecoder` (query self-attention mixes all modalities' queries).
        dropout: as :class:`BasicDecoder`.

    Queries are concatenated in **sorted modality order** (as DeepMind's); the output ``[B, ΣQ,
    output_channels]`` is split by :meth:`output_modality_sizes`.
    """

    def __init__(
        self,
        queries: Mapping[str, nn.Module],
        *,
        latent_channels: int,
        output_channels: int,
        min_padding_size: int = 2,
        num_heads: int = 1,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        use_query_residual: bool = False,
        activation: Activation = "gelu_tanh",
        num_cross_attends: int = 1,
        num_self_attends_per_cross: int = 0,
        num_self_attention_heads: int | None = None,
        cross_attention_shape_for_attn: Literal["kv", "q"] = "kv",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not queries:
            raise ValueError("MultimodalDecoder needs at least one modality")
        self.modalities = sorted(queries)
        self.queries = nn.ModuleDict({m: queries[m] for m in self.modalities})
        self.query_channels = max(q.num_channels for q in queries.values()) + min_padding_size
        self.padding = nn.ModuleDict({
            m: TrainablePositionEncoding(1, self.query_channels - self.queries[m].num_channels)
            for m in self.modalities
        })
        self.decoder = BasicDecoder(
            None, query_channels=self.query_channels, latent_channels=latent_channels,
            output_channels=output_channels, num_heads=num_heads, qk_channels=qk_channels, v_channels=v_channels,
            use_query_residual=use_query_residual, activation=activation, num_cross_attends=num_cross_attends,
            num_self_attends_per_cross=num_self_attends_per_cross, num_self_attention_heads=num_self_attention_heads,
            cross_attention_shape_for_attn=cross_attention_shape_for_attn, dropout=dropout,
        )
        self.output_channels = output_channels

    def decoder_query(
        self,
        inputs: Tensor,
        *,
        modality_sizes: Mapping[str, int] | None = None,
        inputs_without_pos: Mapping[str, Tensor] | None = None,
        subsampled_points: Mapping[str, Tensor | None] | None = None,
        stream: bool = False,
    ) -> Tensor | ContextStream:
        """→ ``[B, ΣQ_m, query_channels]`` in sorted modality order (``stream=True``: a
        :class:`~perceivers.layers.ContextStream` of them when a modality's Fourier queries stream, each
        chunk assembled from the modalities' rows it covers)."""
        subsampled_points = dict(subsampled_points or {})
        unknown = set(subsampled_points) - set(self.modalities)
        if unknown:
            raise ValueError(f"subsampled_points has unknown modalities {sorted(unknown)}; known: {self.modalities}")
        batch = inputs.shape[0]
        parts = []  # (queries [B, Q_m, C_m] or their stream, padding them to query_channels)
        for m in self.modalities:
            builder = self.queries[m]
            points = subsampled_points.get(m)
            kw = {"stream": True} if stream and isinstance(builder, FourierQueries) else {}
            parts.append((builder(batch, inputs=inputs, subsampled_points=points, **kw), padder(self.padding[m])))
        return concat_rows(parts, self.query_channels)

    def output_modality_sizes(self, subsampled_points: Mapping[str, Tensor | None] | None = None) -> dict[str, int]:
        """Rows per modality in the output: ``len(points)`` when subsampled, else the full query count."""
        subsampled_points = subsampled_points or {}
        sizes = {}
        for m in self.modalities:
            points = subsampled_points.get(m)
            sizes[m] = int(points.numel()) if points is not None else int(self.queries[m].num_queries)
        return sizes

    def forward(self, query: Tensor | ContextStream, latents: Tensor, *, query_mask: Tensor | None = None) -> Tensor:
        return self.decoder(query, latents, query_mask=query_mask)

    def decode_modalities(
        self,
        query: Tensor | ContextStream,
        latents: Tensor,
        modality_sizes: Mapping[str, int],
        *,
        heads: Mapping[str, Callable[[Tensor], Tensor] | None] | None = None,
        query_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Each modality's decoded rows ``[B, Q_m, output_channels]``, or ``[B, Q_m, K_m]`` through
        ``heads[m]`` (a row-wise map, see :meth:`MultimodalPostprocessor.heads
        <perceivers.io.processors.MultimodalPostprocessor.heads>`).

        When the shared decoder decodes ``query`` in chunks, each modality is decoded on its own and its
        head applied chunk by chunk, so the ``output_channels``-wide output of all queries (512 × 800k
        values for the official model's video) is never built; otherwise the whole set is decoded at once
        and split."""
        heads = dict(heads or {})
        total = sum(modality_sizes.values())
        if query.shape[1] != total:
            raise ValueError(f"expected {total} queries for modality sizes {dict(modality_sizes)}, "
                             f"got {query.shape[1]}")
        decoder = self.decoder
        size = decoder._decode_chunk_size(query, latents)
        if not size:
            parts = restructure(modality_sizes, decoder(query, latents, query_mask=query_mask))
            return {m: parts[m] if heads.get(m) is None else heads[m](parts[m]) for m in parts}
        # the whole set's chunk size and prepared latents, for each modality's rows in turn
        query_mask = decoder._checked(query, latents, query_mask)
        kvs = decoder._prepare(latents, size)
        out, start = {}, 0
        for m in sorted(modality_sizes):
            stop = start + modality_sizes[m]
            mask = None if query_mask is None else query_mask[:, start:stop]
            out[m] = decoder._decode_in_chunks(_query_rows(query, start, stop), latents, mask, size, kvs, heads.get(m))
            start = stop
        return out


def _query_rows(query: Tensor | ContextStream, start: int, stop: int) -> Tensor | ContextStream:
    """Queries ``start:stop`` of ``query [B, Q, C]``, a stream's as a stream of those rows."""
    if not isinstance(query, ContextStream):
        return query[:, start:stop]
    return ContextStream(query.batch, stop - start, query.channels, lambda a, b: query.chunk(start + a, start + b),
                         query.chunk_size, query.dtype, query.device)
