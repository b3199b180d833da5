"""The Perceiver (arXiv 2103.03206) with perceiver-pytorch's API and numerics.

``depth`` blocks, each: latents cross-attend the input, then ``self_per_cross_attn`` latent
self-attention layers. A drop-in replacement for ``perceiver_pytorch.Perceiver`` (0.11.0): the same
keyword arguments, forward options and outputs for the same weights (see
:func:`perceivers.convert.from_lucidrains`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import (
    ContextStream,
    CrossAttentionBlock,
    FourierPositionEncoding,
    GridContext,
    KeyValue,
    SelfAttentionBlock,
    auto_chunk_size,
    check_chunk_size,
    check_mask,
    grid_attention,
    loops,
    onnx_loops,
)
from ..layers.stream import DEFAULT_CHUNK
from ..validation import check_count, check_finite
from .common import (
    AttentionResidual,
    ClassifierHead,
    LayerSchedule,
    LogitsAlias,
    check_input,
    flatten_axes,
    initial_latents,
    start_hiddens,
    tie_schedule,
)

__all__ = ["Perceiver", "PerceiverBlock"]

_WITH_POS = "with pos=, data is flattened to its points and pos holds their coordinates"


@configurable
class PerceiverBlock(nn.Module):
    """Cross-attention + GEGLU feed-forward, then ``self_per_cross_attn`` × (self-attention + feed-forward).

    Arguments as ``perceiver_pytorch.PerceiverBlock``; projections q/k/v carry no bias, MLPs are
    GEGLU with a 4× hidden width, every sublayer is pre-norm with a residual.
    """

    def __init__(
        self,
        *,
        dim: int,
        context_dim: int | None = None,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        self_per_cross_attn: int = 1,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        has_cross_attn: bool = True,
        queries_contribute_kv: bool = False,
    ) -> None:
        super().__init__()
        check_count(dim=dim, cross_heads=cross_heads, latent_heads=latent_heads, cross_dim_head=cross_dim_head,
                    latent_dim_head=latent_dim_head)
        check_count(self_per_cross_attn=self_per_cross_attn, minimum=0)
        self.dim = dim
        context_dim = dim if context_dim is None else context_dim
        if queries_contribute_kv and context_dim != dim:
            raise ValueError(f"queries_contribute_kv needs context_dim == dim, got {context_dim} and {dim}")
        self.queries_contribute_kv = queries_contribute_kv
        self.cross_attn = (
            CrossAttentionBlock(
                dim, context_dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head,
                qkv_bias=False, query_residual=True, mlp_mult=4, activation="geglu",
                attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            )
            if has_cross_attn
            else None
        )
        self.self_attns = nn.ModuleList(
            SelfAttentionBlock(
                dim, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=False,
                mlp_mult=4, activation="geglu", attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            )
            for _ in range(self_per_cross_attn)
        )

    def project_kv(self, context: Tensor) -> KeyValue:
        """Keys and values of the (normalised) context for this block's cross-attention."""
        if self.cross_attn is None:
            raise ValueError("this block has no cross-attention")
        return self.cross_attn.project_kv(context)

    def prepare_context(
        self, context: Tensor, inverted_attention: bool = False, *, num_queries: int | None = None
    ) -> KeyValue | Tensor:
        """What the cross-attention needs of ``context`` for ``num_queries`` latents (pass it as ``kv=``;
        see ``CrossAttentionBlock.prepare``)."""
        if self.cross_attn is None:
            raise ValueError("this block has no cross-attention")
        if self.queries_contribute_kv:
            return self.project_kv(context)
        return self.cross_attn.prepare(context, inverted=inverted_attention, num_queries=num_queries)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        inverted_attention: bool = False,
        *,
        kv: KeyValue | Tensor | ContextStream | None = None,
    ) -> Tensor:
        """Latents ``x [B, N, D]`` attend ``context [B, M, C]`` (or precomputed ``kv``) → ``[B, N, D]``.

        ``kv``: from :meth:`project_kv` or :meth:`prepare_context`, or a ``ContextStream``.
        """
        if self.cross_attn is not None:
            if kv is None:  # called directly: check what the caller gave (Perceiver has checked already)
                check_input(x, name="x", channels=self.cross_attn.attn.q_dim, axes=1, module=self)
                if context is None:
                    raise ValueError("this block has cross-attention: pass context [batch, n, context_dim]")
                check_input(context, name="context", channels=self.cross_attn.attn.kv_dim, axes=1, module=self)
                if context.shape[0] != x.shape[0]:
                    raise ValueError(f"context has batch size {context.shape[0]} but x has {x.shape[0]}")
                mask = check_mask(mask, context.shape[0], context.shape[1], device=context.device)
                kv = self.prepare_context(context, inverted_attention, num_queries=x.shape[1])
            if self.queries_contribute_kv:
                if isinstance(kv, ContextStream):
                    kv = self.project_kv(kv.materialize())
                elif isinstance(kv, Tensor):  # a normalised context from CrossAttentionBlock.prepare
                    kv = self.cross_attn.attn.project_kv(kv)
                kq, vq = self.cross_attn.attn.project_kv(self.cross_attn.norm_q(x))
                kv = (torch.cat((kq, kv[0]), dim=2), torch.cat((vq, kv[1]), dim=2))
                if mask is not None:
                    mask = torch.cat((mask.new_ones(mask.shape[0], x.shape[1]), mask), dim=-1)
            x = self.cross_attn(x, mask=mask, kv=kv, inverted=inverted_attention)
        elif kv is None:  # a latent-only block called directly
            check_input(x, name="x", channels=self.dim, axes=1, module=self)
        for layer in self.self_attns:
            x = layer(x)
        return x


@configurable
class Perceiver(LogitsAlias, nn.Module):
    """Perceiver classifier over inputs ``[B, *axes, input_channels]`` (channels last).

    Args:
        num_freq_bands: K, Fourier bands per input axis.
        depth: number of blocks (cross-attention → ``self_per_cross_attn`` self-attentions).
        max_freq: μ; band frequencies are ``linspace(1, max_freq / 2, K)``.
        freq_base: if set, log-spaced bands ``freq_base ** linspace(1, log_base(μ / 2), K)`` instead, as
            perceiver-pytorch before 0.7.3 and the multi-modality fork's ``Perceiver`` (see :mod:`perceivers.fork`).
        input_channels: channels of each input element.
        input_axis: number of index axes (1 sequence, 2 image, 3 video).
        num_latents, latent_dim: the latent array ``[num_latents, latent_dim]``.
        cross_heads, latent_heads, cross_dim_head, latent_dim_head: attention heads and per-head widths.
        num_classes: classifier outputs.
        attn_dropout, ff_dropout: dropout on attention probabilities and after each feed-forward.
        weight_tie_layers: share one block among blocks 1..depth-1 (block 0 stays apart).
        fourier_encode_data: append Fourier position features (perceiver-pytorch layout) to the input.
        self_per_cross_attn: self-attention layers per block.
        final_classifier_head: pool + classify; if False the output is the latents ``[B, N, D]``.
        inverted_cross_attn: slot-attention-style cross-attention, one bool or one per block.
        attn_residual, attn_residual_rank: learned pool over earlier block outputs (perceiver-pytorch 0.10).
        chunk_size: stream large inputs through the cross-attentions this many elements at a time,
            building their Fourier features per chunk, so memory stays bounded (exact up to float
            rounding). ``None`` (default): without autograd, inputs above 32768 elements per sample
            in chunks of a quarter of the input (32768–65536); with autograd, inputs above 65536 in
            chunks of 65536. ``0``: never (nor hand small images to the grid kernel as one chunk, see
            :meth:`context_stream`). A plain attribute, so it can be changed on a built model.
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
        self_per_cross_attn: int = 1,
        final_classifier_head: bool = True,
        inverted_cross_attn: bool | Sequence[bool] = False,
        attn_residual: bool = False,
        attn_residual_rank: int = 64,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        check_count(input_axis=input_axis, num_latents=num_latents, latent_dim=latent_dim)
        check_count(minimum=0, input_channels=input_channels)
        self.chunk_size = check_chunk_size(chunk_size)
        if isinstance(inverted_cross_attn, bool):
            inverted_cross_attn = (inverted_cross_attn,) * depth
        if len(inverted_cross_attn) != depth:
            raise ValueError(f"inverted_cross_attn needs {depth} entries (one per block), got {len(inverted_cross_attn)}")
        self.input_axis = input_axis
        self.input_channels = input_channels
        self.max_freq, self.num_freq_bands, self.freq_base = max_freq, num_freq_bands, freq_base
        self.inverted_cross_attn = tuple(bool(v) for v in inverted_cross_attn)
        self.position_encoding = (
            FourierPositionEncoding(input_axis, num_freq_bands, max_freq, layout="lucidrains", freq_base=freq_base)
            if fourier_encode_data
            else None
        )
        self.fourier_encode_data = fourier_encode_data
        context_dim = input_channels + (self.position_encoding.num_channels if fourier_encode_data else 0)
        if context_dim == 0:
            raise ValueError("input_channels=0 (positions as the only input) needs fourier_encode_data=True")
        self.context_dim = context_dim

        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.block_order = tie_schedule(depth, weight_tie_layers)
        num_unique = max(self.block_order) + 1
        self.blocks = nn.ModuleList(
            PerceiverBlock(
                dim=latent_dim, context_dim=context_dim, cross_heads=cross_heads, latent_heads=latent_heads,
                cross_dim_head=cross_dim_head, latent_dim_head=latent_dim_head,
                self_per_cross_attn=self_per_cross_attn, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            )
            for _ in range(num_unique)
        )
        self.attn_residuals = (
            nn.ModuleList(AttentionResidual(latent_dim, attn_residual_rank) for _ in range(num_unique))
            if attn_residual
            else None
        )
        self.head = ClassifierHead(latent_dim, num_classes) if final_classifier_head else nn.Identity()

    @property
    def layers(self) -> LayerSchedule:
        """The block applied at each of the ``depth`` steps (tied steps share one object), a read-only ``ModuleList``."""
        return LayerSchedule(self.blocks, self.block_order)

    def build_context(self, data: Tensor, pos: Tensor | None = None) -> Tensor:
        """Inputs (+ Fourier features) flattened to the cross-attention context ``[B, M, context_dim]``.

        ``data`` is ``[B, *axes, C]`` on a grid, or ``[B, M, C]`` with per-sample coordinates
        ``pos [B, M, input_axis]`` in ``[-1, 1]`` (point clouds, irregular series, padded batches).
        """
        if pos is not None:
            check_input(data, name="data", channels=self.input_channels, axes=1, module=self, why=_WITH_POS)
            if self.position_encoding is None:
                raise ValueError("pos was given but fourier_encode_data=False: there are no position features")
            if pos.shape != (*data.shape[:2], self.input_axis):
                raise ValueError(
                    f"pos must have shape [batch, n, input_axis] = {(*data.shape[:2], self.input_axis)}, "
                    f"got {tuple(pos.shape)}"
                )
            check_finite(pos, "pos")
            return torch.cat((data, self.position_encoding.encode(pos, data.dtype)), dim=-1)
        check_input(data, name="data", channels=self.input_channels, axes=self.input_axis, module=self)
        context = flatten_axes(data)
        if self.position_encoding is not None:
            feats = self.position_encoding(data.shape[1:-1], device=data.device, dtype=data.dtype)
            context = torch.cat((context, feats.expand(data.shape[0], -1, -1)), dim=-1)
        return context

    def context_stream(
        self, data: Tensor, pos: Tensor | None = None, *, masked: bool = False
    ) -> ContextStream | None:
        """The context as a :class:`~perceivers.layers.ContextStream` when ``chunk_size`` streams it, else None.

        Chunks hold the input rows and the Fourier features of those positions only. An image
        ``[B, H, W, C]`` (or a video ``[B, T, H, W, C]``, its ``T·H`` rows as the grid's rows) with
        Fourier features also carries its :class:`~perceivers.layers.GridContext`,
        on CPU in float32 without a mask (``masked``) it is given as a one-chunk stream even when too
        small to stream, so that the native grid kernel attends it, in inference and in training
        (:mod:`perceivers.layers.grid_attention`; ``chunk_size=0`` turns that off too).
        """
        if not isinstance(data, Tensor) or data.ndim < 3 or any(self.inverted_cross_attn):
            return None
        m = data.shape[1] if pos is not None else math.prod(data.shape[1:-1])
        grad = torch.is_grad_enabled() and (data.requires_grad or any(p.requires_grad for p in self.parameters()))
        size = auto_chunk_size(m, self.chunk_size, grad=grad)
        gridded = self.position_encoding is not None and pos is None and data.ndim in (4, 5)
        dropout = self.training and any(b.cross_attn.attn.dropout > 0 for b in self.blocks if b.cross_attn)
        if not size and gridded and self.chunk_size is None and grid_attention.serves(
                data, masked=masked, dropout=dropout, pixels=m):
            size = m
        # a symbolic length (grid size or number of points), exported: a torch.while_loop over chunks
        looped = not size and loops(m, self.chunk_size, grad=grad)
        if looped:
            size = self.chunk_size or DEFAULT_CHUNK
        if not size:
            return None
        if pos is not None:
            check_input(data, name="data", channels=self.input_channels, axes=1, module=self, why=_WITH_POS)
            if self.position_encoding is None or not isinstance(pos, Tensor) or pos.shape != (*data.shape[:2],
                                                                                               self.input_axis):
                return None  # build_context raises the error
            check_finite(pos, "pos")
        else:
            check_input(data, name="data", channels=self.input_channels, axes=self.input_axis, module=self)
        flat = flatten_axes(data)
        b = flat.shape[0]
        enc = self.position_encoding
        gather = None  # rows by position, for a looped stream
        if enc is None:
            chunk = lambda a, z: flat[:, a:z]
            gather = lambda index: flat.index_select(1, index)
        elif pos is not None:
            chunk = lambda a, z: torch.cat((flat[:, a:z], enc.encode(pos[:, a:z], data.dtype)), -1)
            gather = lambda index: torch.cat((flat.index_select(1, index), enc.encode(pos.index_select(1, index),
                                                                                      data.dtype)), -1)
        else:
            shape = tuple(data.shape[1:-1])
            if looped or onnx_loops():  # the per-axis tables once, outside the loop's body
                points = enc.grid_gather(shape, device=data.device, dtype=data.dtype)
                gather = lambda index: torch.cat((flat.index_select(1, index), points(index).expand(b, -1, -1)), -1)
            if len(shape) == 2 and not looped:  # whole image rows per chunk: their features are one broadcast sum
                size = max(shape[1], size - size % shape[1])

            def chunk(a: int, z: int) -> Tensor:
                feats = enc.grid_rows(shape, a, z, device=data.device, dtype=data.dtype)
                return torch.cat((flat[:, a:z], feats.expand(b, -1, -1)), dim=-1)

        grid = None
        if gridded and not looped:  # the grid kernel scores the positions per axis (a video's time and height axes as rows)
            tables = enc.axis_tables(data.shape[1:-1], data.device)
            rows = tables[0] if len(tables) == 2 else (tables[0][:, None] + tables[1][None]).flatten(0, 1)
            grid = GridContext(data.flatten(1, -3), (rows.shape[0], data.shape[-2]), (rows, tables[-1]))
        return ContextStream(b, m, self.context_dim, chunk, size, grid=grid, rows=gather)

    def forward(
        self,
        data: Tensor,
        mask: Tensor | None = None,
        return_embeddings: bool = False,
        block_outputs: Sequence[Tensor] | Tensor | None = None,
        return_hiddens: bool = False,
        *,
        pos: Tensor | None = None,
        latents: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Classify ``data [B, *axes, input_channels]``.

        Args:
            mask: boolean ``[B, *axes]`` or ``[B, M]``, True = attend; applied in every cross-attention.
                A sample with no True gets zeros from each cross-attention (perceiver-pytorch attends
                uniformly to its masked inputs instead); never NaN.
            return_embeddings: return the latents ``[B, num_latents, latent_dim]`` instead of logits.
            block_outputs: earlier hidden states to seed the attention-residual pool with.
            return_hiddens: also return the latents before and after every block (``depth + 1`` tensors).
            pos: per-sample coordinates ``[B, M, input_axis]``; ``data`` is then ``[B, M, C]``.
            latents: start from these latents instead of the learned ones: ``[N', latent_dim]`` or
                ``[B, N', latent_dim]`` (e.g. the previous chunk's ``return_embeddings`` output).

        Returns:
            logits ``[B, num_classes]`` (or the latents, see above), and the hiddens if asked.
        """
        stream = self.context_stream(data, pos, masked=mask is not None)
        context = self.build_context(data, pos) if stream is None else None
        b, m = context.shape[:2] if stream is None else (stream.batch, stream.length)
        mask = check_mask(mask, b, m, device=data.device, axes=data.shape[1:-1])
        x = initial_latents(self.latents, latents, b, like=data)

        keep = return_hiddens or self.attn_residuals is not None or block_outputs is not None
        hiddens: list[Tensor] = []
        if keep:
            hiddens = start_hiddens(block_outputs, x)

        # Tied blocks attend the same context: normalise and project it once per distinct weights
        # (a streamed context is rebuilt chunk by chunk instead; nothing of its size is kept).
        kv_cache: dict[int, KeyValue | Tensor] = {}
        for step, unique in enumerate(self.block_order):
            block = self.blocks[unique]
            if stream is None and unique not in kv_cache:
                kv_cache[unique] = block.prepare_context(context, self.inverted_cross_attn[step],
                                                         num_queries=x.shape[1])
            kv = stream if stream is not None else kv_cache[unique]
            x = block(x, mask=mask, inverted_attention=self.inverted_cross_attn[step], kv=kv)
            if keep:
                hiddens.append(x)
            if self.attn_residuals is not None:
                x = self.attn_residuals[unique](hiddens)

        out = x if return_embeddings else self.head(x)
        return (out, hiddens) if return_hiddens else out
