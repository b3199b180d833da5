"""krasserm's ``perceiver.model.core`` (perceiver-io 0.11) on perceivers' layers.

Same classes, constructor keywords, defaults and state-dict keys as krasserm's backend, so a state
dict saved from ``perceiver.model.core.PerceiverEncoder`` (etc.) loads here with ``strict=True``.
Attention runs through :class:`perceivers.layers.attention.Attention` (SDPA); its projections are
stored under krasserm's names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).

Differences from krasserm's modules (outputs of the public models are unchanged):

* the layer classes (``CrossAttentionLayer``, ``SelfAttentionBlock``, ...) return tensors, not
  ``ModuleOutput``; Perceiver AR features (causal masks, rotary embeddings, KV caches) are not
  here: see :class:`perceivers.CausalLanguageModel`;
* a query whose keys are all padding gets zeros from the attention (krasserm: the mean of all values);
* activation checkpointing uses ``torch.utils.checkpoint`` instead of fairscale's wrapper (same keys).

State dicts of perceiver-io 0.6 (``latent``, ``output_adapter._output_query``,
``input_adapter.pos_encoding``) are renamed to the 0.11 keys on load.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Generic, TypeVar

import torch
from einops import repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from perceivers.layers.attention import Attention
from perceivers.layers.broadcast import per_sample
from perceivers.layers.dense import Linear, linear
from perceivers.layers.position import FourierPositionEncoding as _Fourier
from perceivers.validation import check_index_range, check_tensor

__all__ = [
    "MLP",
    "ClassificationDecoderConfig",
    "ClassificationOutputAdapter",
    "CrossAttention",
    "CrossAttentionLayer",
    "DecoderConfig",
    "EncoderConfig",
    "FourierPositionEncoding",
    "InputAdapter",
    "ModuleOutput",
    "MultiHeadAttention",
    "OutputAdapter",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "PerceiverIOConfig",
    "QueryProvider",
    "Residual",
    "SelfAttention",
    "SelfAttentionBlock",
    "SelfAttentionLayer",
    "TiedTokenOutputAdapter",
    "TokenInputAdapter",
    "TrainableQueryProvider",
    "freeze",
    "init_parameters",
    "positions",
]


# ---------------------------------------------------------------------------------------------------- utilities


class ModuleOutput(OrderedDict):
    """A dict whose keys read as attributes (krasserm's output container)."""

    def __getattr__(self, name):
        if name in self:
            return self[name]
        raise AttributeError(f"No such attribute: {name}")

    def __setattr__(self, name, value):
        self[name] = value


def init_parameters(module: nn.Module, init_scale: float) -> None:
    """Linear and embedding weights ~ N(0, init_scale²), linear biases zero (krasserm's init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.normal_(mean=0.0, std=init_scale)
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.data.normal_(mean=0.0, std=init_scale)


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad = False


def positions(b: int, n: int, shift: Tensor | None = None, device: torch.device | None = None) -> Tensor:
    """Positions ``[b, n]``: ``0..n-1`` per row, minus ``shift [b, 1]`` (left padding), clamped at 0."""
    pos = repeat(torch.arange(n, device=device), "n -> b n", b=b)
    if shift is not None:
        if shift.shape != (b, 1):
            raise ValueError(f"shift must have shape {(b, 1)}, got {tuple(shift.shape)}")
        pos = pos - shift
    return torch.clamp(pos, min=0)


def _rename_keys(renames: dict[str, str]):
    """A load-state-dict pre-hook that renames old (perceiver-io 0.6) keys below the module's prefix."""

    def hook(module, state_dict, prefix, *args):
        for old, new in renames.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    return hook


# ---------------------------------------------------------------------------------------------------- attention


class MultiHeadAttention(Attention):
    """perceivers' SDPA :class:`~perceivers.layers.attention.Attention` with krasserm's constructor and keys.

    Scores are scaled by ``(num_qk_channels / num_heads) ** -0.5``; all four projections have biases
    by default. ``max_heads_parallel`` (a memory knob of krasserm's) is accepted and has no effect.
    """

    _KEYS: ClassVar[dict[str, str]] = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "o_proj"}
    to_q = property(lambda self: self.q_proj)
    to_k = property(lambda self: self.k_proj)
    to_v = property(lambda self: self.v_proj)
    to_out = property(lambda self: self.o_proj)

    def __init__(
        self,
        num_heads: int,
        num_q_input_channels: int,
        num_kv_input_channels: int,
        num_qk_channels: int | None = None,
        num_v_channels: int | None = None,
        num_output_channels: int | None = None,
        max_heads_parallel: int | None = None,
        causal_attention: bool = False,
        dropout: float = 0.0,
        qkv_bias: bool = True,
        out_bias: bool = True,
    ) -> None:
        if causal_attention:
            raise NotImplementedError("causal attention (Perceiver AR) is perceivers.CausalLanguageModel's")
        super().__init__(
            num_q_input_channels, num_kv_input_channels, num_heads=num_heads, qk_channels=num_qk_channels,
            v_channels=num_v_channels, out_dim=num_output_channels, qkv_bias=qkv_bias, out_bias=out_bias,
            dropout=dropout,
        )
        for ours, theirs in self._KEYS.items():  # keep one registration, under krasserm's name
            self.add_module(theirs, self._modules.pop(ours))
        self.num_qk_channels, self.num_v_channels = self.qk_channels, self.v_channels
        self.dp_scale = (self.qk_channels // num_heads) ** -0.5
        self.max_heads_parallel = num_heads if max_heads_parallel is None else max_heads_parallel

    def forward(self, x_q: Tensor, x_kv: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """``x_q [B, N, D]`` attends ``x_kv [B, L, C]``; ``pad_mask [B, L]`` True = padding → ``[B, N, F]``."""
        if pad_mask is None:
            return super().forward(x_q, x_kv)
        check_tensor(pad_mask, "pad_mask", kind="bool", layout="[batch, length] (True = padding)")
        if tuple(pad_mask.shape) != tuple(x_kv.shape[:2]):
            raise ValueError(f"pad_mask must have shape [batch, length] = {tuple(x_kv.shape[:2])} (True = padding), "
                             f"got {tuple(pad_mask.shape)}")
        return super().forward(x_q, x_kv, mask=~pad_mask)


class CrossAttention(nn.Module):
    """Pre-layer-norm cross-attention: ``q_norm``, ``kv_norm``, ``attention``."""

    def __init__(self, num_heads: int, num_q_input_channels: int, num_kv_input_channels: int,
                 num_qk_channels: int | None = None, num_v_channels: int | None = None,
                 max_heads_parallel: int | None = None, causal_attention: bool = False, dropout: float = 0.0,
                 qkv_bias: bool = True, out_bias: bool = True) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(num_q_input_channels)
        self.kv_norm = nn.LayerNorm(num_kv_input_channels)
        self.attention = MultiHeadAttention(
            num_heads, num_q_input_channels, num_kv_input_channels, num_qk_channels, num_v_channels,
            max_heads_parallel=max_heads_parallel, causal_attention=causal_attention, dropout=dropout,
            qkv_bias=qkv_bias, out_bias=out_bias,
        )

    def forward(self, x_q: Tensor, x_kv: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return self.attention(self.q_norm(x_q), self.kv_norm(x_kv), pad_mask=pad_mask)


class SelfAttention(nn.Module):
    """Pre-layer-norm self-attention: ``norm``, ``attention``."""

    def __init__(self, num_heads: int, num_channels: int, num_qk_channels: int | None = None,
                 num_v_channels: int | None = None, max_heads_parallel: int | None = None,
                 causal_attention: bool = False, dropout: float = 0.0, qkv_bias: bool = True,
                 out_bias: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_channels)
        self.attention = MultiHeadAttention(
            num_heads, num_channels, num_channels, num_qk_channels, num_v_channels,
            max_heads_parallel=max_heads_parallel, causal_attention=causal_attention, dropout=dropout,
            qkv_bias=qkv_bias, out_bias=out_bias,
        )

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        x = self.norm(x)
        return self.attention(x, x, pad_mask=pad_mask)


class Residual(nn.Module):
    """``x + dropout(module(x, ...))``."""

    def __init__(self, module: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.module = module
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.dropout(self.module(x, *args, **kwargs)) + x


class MLP(nn.Sequential):
    """LayerNorm → Linear(C, w·C) → GELU → Linear(w·C, C)."""

    def __init__(self, num_channels: int, widening_factor: int, bias: bool = True) -> None:
        super().__init__(
            nn.LayerNorm(num_channels),
            Linear(num_channels, widening_factor * num_channels, bias=bias),
            nn.GELU(),
            Linear(widening_factor * num_channels, num_channels, bias=bias),
        )


class _Checkpointed(nn.Sequential):
    """Runs ``forward`` under ``torch.utils.checkpoint`` when ``checkpointing`` is set and grads are on."""

    checkpointing: bool = False
    offloading: bool = False

    def forward(self, *args, **kwargs) -> Tensor:
        if not (self.checkpointing and torch.is_grad_enabled()):
            return self._forward(*args, **kwargs)
        ctx = torch.autograd.graph.save_on_cpu() if self.offloading else nullcontext()
        with ctx:
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)


class CrossAttentionLayer(_Checkpointed):
    """``[Residual](CrossAttention)`` then ``Residual(MLP)`` (indices ``0`` and ``1`` as krasserm's)."""

    def __init__(self, num_heads: int, num_q_input_channels: int, num_kv_input_channels: int,
                 num_qk_channels: int | None = None, num_v_channels: int | None = None,
                 max_heads_parallel: int | None = None, causal_attention: bool = False, widening_factor: int = 1,
                 dropout: float = 0.0, residual_dropout: float = 0.0, attention_residual: bool = True,
                 qkv_bias: bool = True, out_bias: bool = True, mlp_bias: bool = True) -> None:
        cross_attn = CrossAttention(
            num_heads, num_q_input_channels, num_kv_input_channels, num_qk_channels, num_v_channels,
            max_heads_parallel, causal_attention, dropout, qkv_bias, out_bias,
        )
        self.num_qk_channels = cross_attn.attention.num_qk_channels
        self.num_v_channels = cross_attn.attention.num_v_channels
        super().__init__(
            Residual(cross_attn, residual_dropout) if attention_residual else cross_attn,
            Residual(MLP(num_q_input_channels, widening_factor, bias=mlp_bias), residual_dropout),
        )

    def _forward(self, x_q: Tensor, x_kv: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return self[1](self[0](x_q, x_kv, pad_mask=pad_mask))


class SelfAttentionLayer(_Checkpointed):
    """``Residual(SelfAttention)`` then ``Residual(MLP)``."""

    def __init__(self, num_heads: int, num_channels: int, num_qk_channels: int | None = None,
                 num_v_channels: int | None = None, max_heads_parallel: int | None = None,
                 causal_attention: bool = False, widening_factor: int = 1, dropout: float = 0.0,
                 residual_dropout: float = 0.0, qkv_bias: bool = True, out_bias: bool = True,
                 mlp_bias: bool = True) -> None:
        self_attn = SelfAttention(num_heads, num_channels, num_qk_channels, num_v_channels, max_heads_parallel,
                                  causal_attention, dropout, qkv_bias, out_bias)
        self.num_qk_channels = self_attn.attention.num_qk_channels
        self.num_v_channels = self_attn.attention.num_v_channels
        super().__init__(
            Residual(self_attn, residual_dropout),
            Residual(MLP(num_channels, widening_factor, bias=mlp_bias), residual_dropout),
        )

    def _forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return self[1](self[0](x, pad_mask=pad_mask))


class SelfAttentionBlock(nn.Sequential):
    """``num_layers`` :class:`SelfAttentionLayer` s, applied in order."""

    def __init__(self, num_layers: int, num_heads: int, num_channels: int, num_qk_channels: int | None = None,
                 num_v_channels: int | None = None, num_rotary_layers: int = 1, max_heads_parallel: int | None = None,
                 causal_attention: bool = False, widening_factor: int = 1, dropout: float = 0.0,
                 residual_dropout: float = 0.0, activation_checkpointing: bool = False,
                 activation_offloading: bool = False, qkv_bias: bool = True, out_bias: bool = True,
                 mlp_bias: bool = True) -> None:
        layers = [
            SelfAttentionLayer(num_heads, num_channels, num_qk_channels, num_v_channels, max_heads_parallel,
                               causal_attention, widening_factor, dropout, residual_dropout, qkv_bias, out_bias,
                               mlp_bias)
            for _ in range(num_layers)
        ]
        for layer in layers:
            layer.checkpointing, layer.offloading = activation_checkpointing, activation_offloading
        self.num_rotary_layers = num_rotary_layers
        super().__init__(*layers)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        for layer in self:
            x = layer(x, pad_mask=pad_mask)
        return x


# ---------------------------------------------------------------------------------------------------- adapters


class InputAdapter(nn.Module):
    """Turns task input into encoder input ``[B, M, num_input_channels]``."""

    def __init__(self, num_input_channels: int, *args, **kwargs) -> None:
        super().__init__()
        self._num_input_channels = num_input_channels

    @property
    def num_input_channels(self) -> int:
        return self._num_input_channels


class OutputAdapter(nn.Module):
    """Turns decoder output ``[B, O, F]`` into task output."""


class ClassificationOutputAdapter(OutputAdapter):
    """``linear`` to ``num_classes``; ``[B, 1, F]`` → ``[B, num_classes]`` (the query axis squeezed if 1)."""

    def __init__(self, num_classes: int, num_output_query_channels: int) -> None:
        super().__init__()
        self.linear = Linear(num_output_query_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(dim=1)


class QueryProvider:
    """Provides a cross-attention query."""

    @property
    def num_query_channels(self) -> int:
        raise NotImplementedError

    def __call__(self, x=None):
        raise NotImplementedError


class TrainableQueryProvider(nn.Module, QueryProvider):
    """A learned query ``_query [num_queries, C]``, returned as ``[1, num_queries, C]``."""

    def __init__(self, num_queries: int, num_query_channels: int, init_scale: float = 0.02) -> None:
        super().__init__()
        self._query = nn.Parameter(torch.empty(num_queries, num_query_channels))
        with torch.no_grad():
            self._query.normal_(0.0, init_scale)

    @property
    def num_query_channels(self) -> int:
        return self._query.shape[-1]

    def forward(self, x=None) -> Tensor:
        return per_sample(self._query, 1)


class TokenInputAdapter(InputAdapter):
    """Token ids ``[B, N]`` → ``txt_embedding(x) + pos_embedding(positions)`` ``[B, N, C]``."""

    def __init__(self, vocab_size: int, max_seq_len: int, num_input_channels: int, abs_pos_emb: bool = True) -> None:
        super().__init__(num_input_channels)
        self._max_seq_len = max_seq_len
        self._abs_pos_emb = abs_pos_emb
        self.txt_embedding = nn.Embedding(vocab_size, num_input_channels)
        if abs_pos_emb:
            self.pos_embedding = nn.Embedding(max_seq_len, num_input_channels)
        self.register_load_state_dict_pre_hook(_rename_keys({"pos_encoding": "pos_embedding.weight"}))

    @property
    def vocab_size(self) -> int:
        return self.txt_embedding.num_embeddings

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    def forward(self, x: Tensor, abs_pos: Tensor | None = None) -> Tensor:
        check_tensor(x, "token ids", kind="int", ndim=2, layout="[batch, length]")
        check_index_range(x, self.vocab_size, "token ids")
        if not self._abs_pos_emb:
            return self.txt_embedding(x)
        if abs_pos is None:
            if x.shape[1] > self.max_seq_len:
                raise ValueError(f"token ids have length {x.shape[1]} but max_seq_len is {self.max_seq_len}")
            abs_pos = positions(*x.shape, device=x.device)
        else:
            check_index_range(abs_pos, self.max_seq_len, "abs_pos")
            if x.shape[1] < abs_pos.shape[1]:
                abs_pos = abs_pos[:, -x.shape[1]:]  # the right-most positions
        return self.txt_embedding(x) + self.pos_embedding(abs_pos)


class TiedTokenOutputAdapter(OutputAdapter):
    """Logits ``x @ txt_embedding.weightᵀ (+ bias)`` ``[B, N, vocab_size]``."""

    def __init__(self, vocab_size: int, emb_bias: bool = True) -> None:
        super().__init__()
        self._emb_bias = emb_bias
        if emb_bias:
            self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, txt_embedding: nn.Embedding) -> Tensor:
        return linear(x, txt_embedding.weight, self.bias if self._emb_bias else None)


class FourierPositionEncoding(nn.Module):
    """Fourier features of the ``linspace(-1, 1)`` grid of ``input_shape``, a buffer ``position_encoding``
    ``[prod(input_shape), d·(2K+1)]`` in DeepMind's channel order (positions, sines, cosines; bands up
    to ``n/2`` per axis of length ``n``). ``forward(b)`` → ``[b, prod(input_shape), C]``."""

    def __init__(self, input_shape: Sequence[int], num_frequency_bands: int) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_frequency_bands = num_frequency_bands
        enc = _Fourier(len(self.input_shape), num_frequency_bands, self.input_shape, layout="deepmind")
        self.register_buffer("position_encoding", enc(self.input_shape).clone())

    def num_position_encoding_channels(self, include_positions: bool = True) -> int:
        return len(self.input_shape) * (2 * self.num_frequency_bands + include_positions)

    def forward(self, b: int) -> Tensor:
        return repeat(self.position_encoding, "... -> b ...", b=b)


# ---------------------------------------------------------------------------------------------------- models


class PerceiverEncoder(nn.Module):
    """Perceiver IO encoder: latents cross-attend the adapted input, then self-attention blocks.

    Block ``i`` (of ``num_self_attention_blocks``) is preceded by a cross-attention for ``i <
    num_cross_attention_layers``. Block/layer 0 is ``self_attn_1``/``cross_attn_1``; the later ones
    share ``self_attn_n``/``cross_attn_n`` unless the first is shared with them
    (``first_self_attention_block_shared``, default True; ``first_cross_attention_layer_shared``,
    default False). ``forward(x, pad_mask)`` (``pad_mask [B, M]`` True = padding) → latents ``[B, N, D]``.
    """

    def __init__(
        self,
        input_adapter: InputAdapter,
        num_latents: int,
        num_latent_channels: int,
        num_cross_attention_heads: int = 4,
        num_cross_attention_qk_channels: int | None = None,
        num_cross_attention_v_channels: int | None = None,
        num_cross_attention_layers: int = 1,
        first_cross_attention_layer_shared: bool = False,
        cross_attention_widening_factor: int = 1,
        num_self_attention_heads: int = 4,
        num_self_attention_qk_channels: int | None = None,
        num_self_attention_v_channels: int | None = None,
        num_self_attention_layers_per_block: int = 6,
        num_self_attention_blocks: int = 1,
        first_self_attention_block_shared: bool = True,
        self_attention_widening_factor: int = 1,
        dropout: float = 0.0,
        residual_dropout: float = 0.0,
        init_scale: float = 0.02,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ) -> None:
        super().__init__()
        self.latent_provider = TrainableQueryProvider(num_latents, num_latent_channels, init_scale=init_scale)
        self.input_adapter = input_adapter
        if num_cross_attention_layers <= 0:
            raise ValueError(f"num_cross_attention_layers must be > 0, got {num_cross_attention_layers}")
        if num_self_attention_blocks <= 0:
            raise ValueError(f"num_self_attention_blocks must be > 0, got {num_self_attention_blocks}")
        if num_cross_attention_layers > num_self_attention_blocks:
            raise ValueError(
                f"num_cross_attention_layers ({num_cross_attention_layers}) must be <= num_self_attention_blocks "
                f"({num_self_attention_blocks})"
            )
        self.num_cross_attention_layers = num_cross_attention_layers
        self.num_self_attention_blocks = num_self_attention_blocks
        self.first_cross_attention_layer_shared = first_cross_attention_layer_shared
        self.first_self_attention_block_shared = first_self_attention_block_shared

        def cross_attn() -> CrossAttentionLayer:
            layer = CrossAttentionLayer(
                num_heads=num_cross_attention_heads, num_q_input_channels=num_latent_channels,
                num_kv_input_channels=input_adapter.num_input_channels,
                num_qk_channels=num_cross_attention_qk_channels, num_v_channels=num_cross_attention_v_channels,
                widening_factor=cross_attention_widening_factor, dropout=dropout, residual_dropout=residual_dropout,
            )
            layer.checkpointing, layer.offloading = activation_checkpointing, activation_offloading
            return layer

        def self_attn() -> SelfAttentionBlock:
            return SelfAttentionBlock(
                num_layers=num_self_attention_layers_per_block, num_heads=num_self_attention_heads,
                num_channels=num_latent_channels, num_qk_channels=num_self_attention_qk_channels,
                num_v_channels=num_self_attention_v_channels, widening_factor=self_attention_widening_factor,
                dropout=dropout, residual_dropout=residual_dropout,
                activation_checkpointing=activation_checkpointing, activation_offloading=activation_offloading,
            )

        self.cross_attn_1 = cross_attn()
        self.self_attn_1 = self_attn()
        if self.extra_cross_attention_layer:
            self.cross_attn_n = cross_attn()
        if self.extra_self_attention_block:
            self.self_attn_n = self_attn()
        with torch.no_grad():
            init_parameters(self, init_scale)
        self.register_load_state_dict_pre_hook(_rename_keys({"latent": "latent_provider._query"}))

    @property
    def extra_cross_attention_layer(self) -> bool:
        return self.num_cross_attention_layers > 1 and not self.first_cross_attention_layer_shared

    @property
    def extra_self_attention_block(self) -> bool:
        return self.num_self_attention_blocks > 1 and not self.first_self_attention_block_shared

    def forward(self, x, pad_mask: Tensor | None = None, return_adapted_input: bool = False):
        x_adapted = self.input_adapter(x)  # [B, M, C]
        x_latent = self.latent_provider()  # [1, N, D], broadcast over the batch by the attention
        x_latent = self.cross_attn_1(per_sample(x_latent[0], x_adapted.shape[0]), x_adapted, pad_mask=pad_mask)
        x_latent = self.self_attn_1(x_latent)
        cross_attn_n = self.cross_attn_n if self.extra_cross_attention_layer else self.cross_attn_1
        self_attn_n = self.self_attn_n if self.extra_self_attention_block else self.self_attn_1
        for i in range(1, self.num_self_attention_blocks):
            if i < self.num_cross_attention_layers:
                x_latent = cross_attn_n(x_latent, x_adapted, pad_mask=pad_mask)
            x_latent = self_attn_n(x_latent)
        return (x_latent, x_adapted) if return_adapted_input else x_latent


class PerceiverDecoder(nn.Module):
    """Perceiver IO decoder: the provider's queries cross-attend the latents, then ``output_adapter``.

    ``forward(x_latent, x_adapted=None, **kwargs)``: ``x_adapted`` goes to the query provider,
    ``kwargs`` to the output adapter.
    """

    def __init__(
        self,
        output_adapter: OutputAdapter,
        output_query_provider: QueryProvider,
        num_latent_channels: int,
        num_cross_attention_heads: int = 4,
        num_cross_attention_qk_channels: int | None = None,
        num_cross_attention_v_channels: int | None = None,
        cross_attention_widening_factor: int = 1,
        cross_attention_residual: bool = True,
        dropout: float = 0.0,
        init_scale: float = 0.02,
        activation_checkpointing: bool = False,
        activation_offloading: bool = False,
    ) -> None:
        super().__init__()
        self.output_query_provider = output_query_provider
        self.output_adapter = output_adapter
        self.cross_attn = CrossAttentionLayer(
            num_heads=num_cross_attention_heads, num_q_input_channels=output_query_provider.num_query_channels,
            num_kv_input_channels=num_latent_channels, num_qk_channels=num_cross_attention_qk_channels,
            num_v_channels=num_cross_attention_v_channels, widening_factor=cross_attention_widening_factor,
            attention_residual=cross_attention_residual, dropout=dropout,
        )
        self.cross_attn.checkpointing, self.cross_attn.offloading = activation_checkpointing, activation_offloading
        with torch.no_grad():
            init_parameters(self, init_scale)
        self.register_load_state_dict_pre_hook(
            _rename_keys({"output_adapter._output_query": "output_query_provider._query"})
        )

    def forward(self, x_latent: Tensor, x_adapted: Tensor | None = None, *, num_queries: int | None = None, **kwargs):
        """``num_queries``: decode only the first that many output queries (each attends the latents alone)."""
        output_query = self.output_query_provider(x_adapted)  # [1 or B, O, F]
        if num_queries is not None:
            output_query = output_query[:, :num_queries]
        if output_query.shape[0] != x_latent.shape[0]:
            output_query = per_sample(output_query[0], x_latent.shape[0])
        output = self.cross_attn(output_query, x_latent)
        return self.output_adapter(output, **kwargs)


class PerceiverIO(nn.Sequential):
    """``encoder`` (index 0) then ``decoder`` (index 1)."""

    def __init__(self, encoder: PerceiverEncoder, decoder: PerceiverDecoder) -> None:
        super().__init__(encoder, decoder)

    @property
    def encoder(self) -> PerceiverEncoder:
        return self[0]

    @property
    def decoder(self) -> PerceiverDecoder:
        return self[1]


def classification_decoder(config: PerceiverIOConfig, num_queries: int) -> PerceiverDecoder:
    """The classifier decoder of krasserm's text and image classifiers: ``num_queries`` trainable queries
    (``config.decoder`` sizes them) cross-attend the latents, then a linear layer to ``num_classes``."""
    dec = config.decoder
    return PerceiverDecoder(
        output_adapter=ClassificationOutputAdapter(dec.num_classes, dec.num_output_query_channels),
        output_query_provider=TrainableQueryProvider(num_queries, dec.num_output_query_channels, dec.init_scale),
        num_latent_channels=config.num_latent_channels,
        activation_checkpointing=config.activation_checkpointing,
        activation_offloading=config.activation_offloading, **dec.base_kwargs(),
    )


# ---------------------------------------------------------------------------------------------------- configs


@dataclass
class EncoderConfig:
    num_cross_attention_heads: int = 8
    num_cross_attention_qk_channels: int | None = None
    num_cross_attention_v_channels: int | None = None
    num_cross_attention_layers: int = 1
    first_cross_attention_layer_shared: bool = False
    cross_attention_widening_factor: int = 1
    num_self_attention_heads: int = 8
    num_self_attention_qk_channels: int | None = None
    num_self_attention_v_channels: int | None = None
    num_self_attention_layers_per_block: int = 8
    num_self_attention_blocks: int = 1
    first_self_attention_block_shared: bool = True
    self_attention_widening_factor: int = 1
    dropout: float = 0.0
    init_scale: float = 0.02
    freeze: bool = False

    def base_kwargs(self, exclude=("freeze",)) -> dict:
        return _base_kwargs(self, EncoderConfig, exclude)


@dataclass
class DecoderConfig:
    num_cross_attention_heads: int = 8
    num_cross_attention_qk_channels: int | None = None
    num_cross_attention_v_channels: int | None = None
    cross_attention_widening_factor: int = 1
    cross_attention_residual: bool = True
    dropout: float = 0.0
    init_scale: float = 0.02
    freeze: bool = False

    def base_kwargs(self, exclude=("freeze",)) -> dict:
        return _base_kwargs(self, DecoderConfig, exclude)


@dataclass
class ClassificationDecoderConfig(DecoderConfig):
    num_output_queries: int = 1
    num_output_query_channels: int = 256
    num_classes: int = 100


E = TypeVar("E", bound=EncoderConfig)
D = TypeVar("D", bound=DecoderConfig)


@dataclass
class PerceiverIOConfig(Generic[E, D]):
    encoder: E
    decoder: D
    num_latents: int
    num_latent_channels: int
    activation_checkpointing: bool = False
    activation_offloading: bool = False


def _base_kwargs(config, base_class, exclude) -> dict:
    names = {f.name for f in fields(base_class)} - set(exclude)
    return {k: v for k, v in asdict(config).items() if k in names}

