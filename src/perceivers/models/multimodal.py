"""Multi-modality Perceiver: one latent array cross-attends several modalities at once.

The API and numerics of the ``perceiver-multi-modality-pytorch`` fork (1.4.0, ``MultiModalityPerceiver``, its
text variant and ``HierarchicalMultiModalityPerceiver``, whose latents get fewer and wider per layer), with
three fixes (see ``docs/multimodal.md``): the one-hot modality code is fixed by the *declared* modalities, masks can
be given per modality, and ``num_classes=None`` returns pooled embeddings.

Every modality ``[B, *axes, C_m]`` becomes ``[B, N_m, W]`` tokens whose channels are, in order::

    [data (C_m) | zeros | Fourier features (axes · (2K + 1)) | one-hot modality code (M)]

with ``M`` the number of declared modalities and ``W = max_m(input_dim_m) + M``. Modalities are concatenated
along the token axis in sorted name order. The Fourier bands are the fork's log-spaced ones,
``freq_base ** linspace(1, log_base(max_freq / 2), K)`` (so the lowest band is ``freq_base``, not 1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import (
    CrossAttentionBlock,
    KeyValue,
    SelfAttentionBlock,
    check_mask,
    fourier_features,
    linear_positions,
)
from ..layers.broadcast import per_sample
from ..layers.dense import Linear
from ..validation import check_index_range
from .common import LogitsAlias, check_input, flatten_axes, tie_schedule

__all__ = [
    "HierarchicalConfigurator",
    "HierarchicalMultiModalityPerceiver",
    "HierarchicalMultiModalityPerceiverNoPooling",
    "InputModality",
    "InputModalityWithEmbedding",
    "MultiModalityPerceiver",
    "MultiModalityPerceiverNoPooling",
    "MultiModalityWithTextPerceiver",
    "latent_block_schedule",
    "log_spaced_fourier_features",
]


def log_spaced_fourier_features(pos: Tensor, num_bands: int, max_freq: float, base: float = 2) -> Tensor:
    """Fourier features with log-spaced bands (perceiver-pytorch < 0.7.3 and the multi-modality fork).

    Per axis ``[sin(π x s_1..K), cos(π x s_1..K), x]`` with ``s = base ** linspace(1, log_base(max_freq / 2), K)``,
    axis-major: ``pos [..., d]`` → ``[..., d · (2K + 1)]``.
    """
    return fourier_features(pos, num_bands, max_freq, layout="lucidrains", freq_base=base)


@dataclass
class InputModality:
    """One input modality: data arrives as ``[B, *axes, input_channels]`` with ``input_axis`` index axes.

    Args:
        name: key of this modality in the forward dictionary.
        input_channels: channels of each element (last axis).
        input_axis: number of index axes (1 sequence/audio, 2 image, 3 video).
        num_freq_bands: K, Fourier bands per axis.
        max_freq: the highest band is ``max_freq / 2``.
        freq_base: base of the log-spaced bands; the lowest band is ``freq_base``.
    """

    name: str
    input_channels: int
    input_axis: int
    num_freq_bands: int
    max_freq: float
    freq_base: float = 2

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"modality name must be a non-empty string, got {self.name!r}")
        for field in ("input_channels", "input_axis", "num_freq_bands"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"modality {self.name!r}: {field} must be a positive int, got {value!r}")
        if self.max_freq <= 0 or self.freq_base <= 0 or self.freq_base == 1:
            raise ValueError(
                f"modality {self.name!r}: need max_freq > 0 and freq_base > 0, != 1; got max_freq={self.max_freq}, "
                f"freq_base={self.freq_base}"
            )

    @property
    def position_channels(self) -> int:
        """Fourier feature channels, ``input_axis · (2K + 1)``."""
        return self.input_axis * (2 * self.num_freq_bands + 1)

    @property
    def input_dim(self) -> int:
        """Data plus Fourier channels (without padding or the modality code)."""
        return self.input_channels + self.position_channels

    def position_features(
        self, index_shape: Sequence[int], *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Fourier features of the ``linspace(-1, 1)`` grid of ``index_shape`` → ``[prod(index_shape), C]`` in
        ``dtype`` (computed in float32 at least, float64 for float64)."""
        pos = linear_positions(index_shape, device=device, dtype=dtype).reshape(-1, self.input_axis)
        return log_spaced_fourier_features(pos, self.num_freq_bands, self.max_freq, self.freq_base)


@dataclass
class InputModalityWithEmbedding(InputModality):
    """A token modality (text): ids ``[B, L, 1]`` go through ``embedding``; each layer sees a slice of it.

    With ``embedding=None`` this behaves as a plain :class:`InputModality`. With an embedding of width ``E``,
    layer ``i`` of a :class:`MultiModalityWithTextPerceiver` of depth ``d`` sees channels
    ``[i · E // d, (i + 1) · E // d)`` of the embedded tokens.
    """

    embedding: nn.Embedding | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding is not None:
            if not isinstance(self.embedding, nn.Embedding):
                raise TypeError(f"modality {self.name!r}: embedding must be an nn.Embedding, "
                                f"got {type(self.embedding).__name__}")
            if self.input_axis != 1:
                raise ValueError(f"modality {self.name!r}: an embedded modality needs input_axis=1, "
                                 f"got {self.input_axis}")

    def embedding_dim(self, depth: int) -> int:
        """Token width one layer sees (embedding slice + Fourier channels), or ``input_dim`` without embedding."""
        if self.embedding is None:
            return self.input_dim
        return self.embedding.embedding_dim // depth + self.position_channels


def latent_block_schedule(depth: int, blocks_per_layer: int, weight_tie_layers: bool) -> tuple[tuple[int, ...], ...]:
    """Unique latent self-attention block used at each ``(layer, block)`` position.

    Untied, every position has its own block. Tied (the fork's pattern), block 0 of every layer stays its own
    while blocks ``1..`` are shared by all layers (including layer 0).
    """
    if depth < 1 or blocks_per_layer < 1:
        raise ValueError(f"depth and num_latent_blocks_per_layer must be >= 1, got {depth} and {blocks_per_layer}")
    ids: dict[tuple[int, ...], int] = {}
    order = []
    for i in range(depth):
        row = []
        for j in range(blocks_per_layer):
            key = (-1, j) if weight_tie_layers and j > 0 else (i, j)
            row.append(ids.setdefault(key, len(ids)))
        order.append(tuple(row))
    return tuple(order)


class _MultiModalityInputs(LogitsAlias, nn.Module):
    """What the multi-modality Perceivers share: declared modalities → one token array and key mask, pooling, head.

    Subclasses build their latents and blocks, set ``self.head`` (a module or ``None``) and implement
    :meth:`encode`.
    """

    head: nn.Module | None

    def __init__(self, modalities: Iterable[InputModality], depth: int) -> None:
        super().__init__()
        modalities = list(modalities)
        if not modalities:
            raise ValueError("modalities must declare at least one InputModality")
        for m in modalities:
            if not isinstance(m, InputModality):
                raise TypeError(f"modalities must be InputModality objects, got {type(m).__name__}")
        names = [m.name for m in modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        self.depth = depth
        # Sorted by name: the token order and the one-hot index of each modality.
        self.modalities: dict[str, InputModality] = {m.name: m for m in sorted(modalities, key=lambda m: m.name)}
        self.num_modalities = len(modalities)
        self.context_dim = max(self._token_width(m) for m in modalities) + self.num_modalities

    # -- inputs ---------------------------------------------------------------------------------------------
    def _token_width(self, modality: InputModality) -> int:
        """Channels of a modality's tokens before zero padding and the modality code."""
        return modality.input_dim

    def _check_names(self, data: Mapping[str, Tensor]) -> list[str]:
        if not isinstance(data, Mapping):
            raise TypeError(f"multi_modality_data must be a dict name -> Tensor, got {type(data).__name__}")
        if not data:
            raise ValueError(f"multi_modality_data is empty; declared modalities: {sorted(self.modalities)}")
        unknown = sorted(set(data) - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown modality {unknown}; declared modalities: {sorted(self.modalities)}")
        return sorted(data)

    def _check_modality(self, name: str, x: Tensor) -> None:
        m = self.modalities[name]
        check_input(x, name=f"multi_modality_data[{name!r}]", channels=m.input_channels, axes=m.input_axis,
                    module=self)

    def _tokens(self, name: str, values: Tensor) -> Tensor:
        """``values [B, *axes, C]`` → ``[B, N, context_dim]``: values, zeros, Fourier features, one-hot code."""
        m = self.modalities[name]
        b, *axes, c = values.shape
        index = list(self.modalities).index(name)
        pad = self.context_dim - self.num_modalities - m.position_channels - c
        code = torch.zeros(self.num_modalities, device=values.device)
        code[index] = 1.0
        # float32 features (the fork's), float64 ones in a float64 model
        pos = m.position_features(axes, device=values.device, dtype=torch.promote_types(values.dtype, torch.float32))
        static = torch.cat((pos.new_zeros(pos.shape[0], pad), pos, code.to(pos.dtype).expand(pos.shape[0], -1)), dim=-1)
        static = static.to(values.dtype).expand(b, -1, -1)  # [B, N, W - C]
        return torch.cat((flatten_axes(values), static), dim=-1)

    def _merge_masks(
        self, data: Mapping[str, Tensor], names: list[str], lengths: list[int], batch: int, mask: Tensor | None,
        masks: Mapping[str, Tensor] | None,
    ) -> Tensor | None:
        if masks is None:
            return check_mask(mask, batch, sum(lengths), device=self._device())
        if mask is not None:
            raise ValueError("give either mask (over the concatenated tokens) or masks (per modality), not both")
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a dict name -> bool Tensor, got {type(masks).__name__}")
        unknown = sorted(set(masks) - set(names))
        if unknown:
            raise ValueError(f"masks given for {unknown}, which are not in the input; present modalities: {names}")
        if not masks:
            return None
        parts = []
        for name, n in zip(names, lengths):
            m = masks.get(name)
            x = data[name]  # [B, *axes, C], or token ids [B, L]
            axes = x.shape[1:-1] if x.ndim > 2 else x.shape[1:]
            m = check_mask(m, batch, n, name=f"masks[{name!r}]", device=self._device(), axes=axes) if m is not None else None
            parts.append(m if m is not None else torch.ones(batch, n, dtype=torch.bool, device=self._device()))
        return torch.cat([p.to(parts[0].device) for p in parts], dim=1)

    def _batch_size(self, data: Mapping[str, Tensor], names: list[str]) -> int:
        sizes = {name: data[name].shape[0] for name in names}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"all modalities must share the batch size, got {sizes}")
        return next(iter(sizes.values()))

    def build_context(
        self,
        multi_modality_data: Mapping[str, Tensor],
        mask: Tensor | None = None,
        *,
        masks: Mapping[str, Tensor] | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """Validate the inputs and build the cross-attention context(s) and key mask.

        Returns:
            one context ``[B, M, context_dim]`` per layer (a single shared one here) and the mask ``[B, M]``.
        """
        names = self._check_names(multi_modality_data)
        for name in names:
            self._check_modality(name, multi_modality_data[name])
        batch = self._batch_size(multi_modality_data, names)
        tokens = [self._tokens(name, multi_modality_data[name]) for name in names]
        mask = self._merge_masks(multi_modality_data, names, [t.shape[1] for t in tokens], batch, mask, masks)
        return [torch.cat(tokens, dim=1)], mask
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # -- model ----------------------------------------------------------------------------------------------
    def encode(self, contexts: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """``contexts`` (one per layer, or a single shared one) and key ``mask`` → latents ``[B, N, D]``."""
        raise NotImplementedError

    def pool(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` → ``[B, D]`` (mean over latents); override for other pooling."""
        return x.mean(dim=-2)

    def forward(
        self,
        multi_modality_data: Mapping[str, Tensor],
        mask: Tensor | None = None,
        *,
        masks: Mapping[str, Tensor] | None = None,
        return_embeddings: bool = False,
    ) -> Tensor:
        """Encode a dictionary ``name → [B, *axes, channels]`` (a subset of the declared modalities is fine).

        Args:
            mask: boolean ``[B, M]`` over the concatenated tokens (sorted name order), True = attend.
            masks: per-modality boolean masks ``name → [B, *axes]`` (or ``[B, N_m]``), True = attend; modalities
                without one are fully attended. Not together with ``mask``.
            return_embeddings: return the latents ``[B, num_latents, latent_dim]``.

        Returns:
            logits ``[B, num_classes]``, or the pooled latents ``[B, latent_dim]`` when ``num_classes`` is None.
        """
        contexts, mask = self.build_context(multi_modality_data, mask, masks=masks)
        x = self.encode(contexts, mask)
        if return_embeddings:
            return x
        x = self.pool(x)
        return x if self.head is None else self.head(x)


@configurable
class MultiModalityPerceiver(_MultiModalityInputs):
    """Perceiver over a dictionary of modalities (``perceiver_pytorch.multi_modality_perceiver`` compatible).

    Each of ``depth`` layers: latents cross-attend all modalities (+ feed-forward), then a latent transformer of
    ``num_latent_blocks_per_layer`` self-attention blocks, wrapped in one more residual (``x = x + T(x)``, as
    the fork does on top of the blocks' own residuals).

    Args:
        modalities: the declared :class:`InputModality` objects (unique names).
        depth: number of cross-attention layers.
        num_latents, latent_dim: the latent array ``[num_latents, latent_dim]``.
        cross_heads, latent_heads, cross_dim_head, latent_dim_head: heads and per-head widths.
        num_classes: classifier outputs; ``None`` returns the mean-pooled latents ``[B, latent_dim]``.
        attn_dropout, ff_dropout: dropout on the attention probabilities and after each feed-forward.
        weight_tie_layers: share the cross-attention (+ FF) of layers ``1..depth-1`` and latent blocks ``1..``
            across all layers (latent block 0 stays per layer), as the fork does.
        num_latent_blocks_per_layer: self-attention blocks per layer.
        use_gelu: GELU feed-forwards (``Linear → GELU → Linear``) instead of GEGLU.
    """

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int | None = None,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = False,
    ) -> None:
        super().__init__(modalities, depth)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        activation = "gelu" if use_gelu else "geglu"
        self.cross_order = tie_schedule(depth, weight_tie_layers)
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(
                latent_dim, self.context_dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head,
                qkv_bias=False, query_residual=True, mlp_mult=4, activation=activation,
                attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            )
            for _ in range(max(self.cross_order) + 1)
        )
        self.latent_order = latent_block_schedule(depth, num_latent_blocks_per_layer, weight_tie_layers)
        self.latent_blocks = nn.ModuleList(
            SelfAttentionBlock(
                latent_dim, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=False,
                mlp_mult=4, activation=activation, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            )
            for _ in range(max(max(row) for row in self.latent_order) + 1)
        )
        # LayerNorm → Linear on the pooled latents (pooling is :meth:`pool`, overridable as in the fork)
        self.head = (
            nn.Sequential(OrderedDict(norm=nn.LayerNorm(latent_dim), proj=Linear(latent_dim, num_classes)))
            if num_classes is not None
            else None
        )

    def encode(self, contexts: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """Run the layers; ``contexts`` holds one context per layer or a single shared one → ``[B, N, D]``."""
        b = contexts[0].shape[0]
        x = per_sample(self.latents.to(contexts[0].dtype), b)
        kv_cache: dict[int, KeyValue] = {}  # tied layers attending one shared context project it once
        for step, unique in enumerate(self.cross_order):
            block = self.cross_blocks[unique]
            if len(contexts) == 1:
                if unique not in kv_cache:
                    kv_cache[unique] = block.project_kv(contexts[0])
                kv = kv_cache[unique]
            else:
                kv = block.project_kv(contexts[step])
            x = block(x, mask=mask, kv=kv)
            h = x
            for j in self.latent_order[step]:
                h = self.latent_blocks[j](h)
            x = x + h  # the fork's outer residual around its latent transformer
        return x


@configurable
class MultiModalityPerceiverNoPooling(MultiModalityPerceiver):
    """:class:`MultiModalityPerceiver` that returns the latents ``[B, num_latents, latent_dim]`` (no head).

    As in the fork, the default feed-forward is GELU (``use_gelu=True``).
    """

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = True,
    ) -> None:
        super().__init__(
            modalities=modalities, depth=depth, num_latents=num_latents, latent_dim=latent_dim,
            cross_heads=cross_heads, latent_heads=latent_heads, cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head, num_classes=None, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            weight_tie_layers=weight_tie_layers, num_latent_blocks_per_layer=num_latent_blocks_per_layer,
            use_gelu=use_gelu,
        )

    def pool(self, x: Tensor) -> Tensor:
        return x


@configurable
class MultiModalityWithTextPerceiver(MultiModalityPerceiver):
    """Multi-modality Perceiver where token modalities are embedded and each layer sees its own slice.

    Modalities are :class:`InputModalityWithEmbedding` (or plain :class:`InputModality`). An embedded modality
    takes integer ids ``[B, L, 1]`` (or ``[B, L]``); layer ``i`` cross-attends channels
    ``[i · E // depth, (i + 1) · E // depth)`` of its embedding. The other modalities are seen whole by every
    layer. The embeddings are registered in ``self.embeddings`` (``embeddings.<name>.weight``).
    Defaults follow the fork (6 latent blocks per layer, 1000 classes, GEGLU).
    """

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int | None = 1000,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 6,
        use_gelu: bool = False,
    ) -> None:
        modalities = list(modalities)
        super().__init__(
            modalities=modalities, depth=depth, num_latents=num_latents, latent_dim=latent_dim,
            cross_heads=cross_heads, latent_heads=latent_heads, cross_dim_head=cross_dim_head,
            latent_dim_head=latent_dim_head, num_classes=num_classes, attn_dropout=attn_dropout,
            ff_dropout=ff_dropout, weight_tie_layers=weight_tie_layers,
            num_latent_blocks_per_layer=num_latent_blocks_per_layer, use_gelu=use_gelu,
        )
        self.embeddings = nn.ModuleDict(
            {m.name: m.embedding for m in modalities if getattr(m, "embedding", None) is not None}
        )
        for name, emb in self.embeddings.items():
            if emb.embedding_dim < depth:
                raise ValueError(f"modality {name!r}: embedding_dim={emb.embedding_dim} must be >= depth={depth} "
                                 "so that every layer gets at least one channel")

    def _token_width(self, modality: InputModality) -> int:
        if isinstance(modality, InputModalityWithEmbedding):
            return modality.embedding_dim(self.depth)  # set by the base __init__ before it asks for widths
        return modality.input_dim

    def _check_modality(self, name: str, x: Tensor) -> None:
        if name not in self.embeddings:
            return super()._check_modality(name, x)
        label = f"multi_modality_data[{name!r}]"
        if not isinstance(x, Tensor):
            raise TypeError(f"{label} must be a torch.Tensor of token ids, got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{label} must hold integer token ids, got dtype {x.dtype}")
        if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 1)):
            raise ValueError(f"{label} must have shape [batch, length, 1] or [batch, length], got {tuple(x.shape)}")
        check_index_range(x, self.embeddings[name].num_embeddings, f"{label} (token ids)")

    def build_context(
        self,
        multi_modality_data: Mapping[str, Tensor],
        mask: Tensor | None = None,
        *,
        masks: Mapping[str, Tensor] | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """One context ``[B, M, context_dim]`` per layer (embedded modalities differ per layer) and the mask."""
        names = self._check_names(multi_modality_data)
        for name in names:
            self._check_modality(name, multi_modality_data[name])
        batch = self._batch_size(multi_modality_data, names)
        per_layer: list[list[Tensor]] = [[] for _ in range(self.depth)]
        for name in names:
            x = multi_modality_data[name]
            if name in self.embeddings:
                ids = x if x.ndim == 2 else x[..., 0]
                embedded = self.embeddings[name](ids)  # [B, L, E]
                width = embedded.shape[-1] // self.depth
                for i in range(self.depth):
                    per_layer[i].append(self._tokens(name, embedded[..., i * width:(i + 1) * width]))
            else:
                tokens = self._tokens(name, x)
                for i in range(self.depth):
                    per_layer[i].append(tokens)
        mask = self._merge_masks(multi_modality_data, names, [t.shape[1] for t in per_layer[0]], batch, mask, masks)
        return [torch.cat(parts, dim=1) for parts in per_layer], mask


@dataclass
class HierarchicalConfigurator:
    """Latent sizes per layer of :class:`HierarchicalMultiModalityPerceiver` (the fork's configurator).

    Layer ``i`` has ``num_latents_begin // 2**i`` latents of width ``latent_dim_begin * 2**i``: the latent
    array gets shorter and wider with depth. Subclasses may override :meth:`get_num_latents` and
    :meth:`get_latent_dim` (the count must not grow from layer to layer).
    """

    depth: int
    num_latents_begin: int
    latent_dim_begin: int

    def __post_init__(self) -> None:
        for field in ("depth", "num_latents_begin", "latent_dim_begin"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"HierarchicalConfigurator.{field} must be a positive int, got {value!r}")

    def _check_index(self, layer_index: int) -> None:
        if not 0 <= layer_index < self.depth:
            raise ValueError(f"layer_index must be in [0, {self.depth}), got {layer_index}")

    def get_num_latents(self, layer_index: int) -> int:
        """Latents of layer ``layer_index``: ``num_latents_begin`` halved (floor) ``layer_index`` times."""
        self._check_index(layer_index)
        num_latents = self.num_latents_begin >> layer_index
        if num_latents < 1:
            raise ValueError(f"num_latents_begin={self.num_latents_begin} halves to 0 latents at layer {layer_index}; "
                             f"a model this deep needs num_latents_begin >= {2 ** layer_index}")
        return num_latents

    def get_latent_dim(self, layer_index: int) -> int:
        """Latent width of layer ``layer_index``: ``latent_dim_begin`` doubled ``layer_index`` times."""
        self._check_index(layer_index)
        return self.latent_dim_begin << layer_index


@configurable
class HierarchicalMultiModalityPerceiver(_MultiModalityInputs):
    """Multi-modality Perceiver whose latent array changes size per layer (the fork's hierarchical model).

    Layer ``i`` owns latents ``[N_i, D_i]`` (``configurator``: by default half as many and twice as wide as
    layer ``i - 1``). Before layer ``i`` cross-attends the modalities, its latents are added to the previous
    layer's output, zero-padded from ``D_{i-1}`` to ``D_i`` channels and cut to its first ``N_i`` latents.
    Each layer then runs like :class:`MultiModalityPerceiver`'s (cross-attention + feed-forward, a latent
    transformer of ``num_latent_blocks_per_layer`` blocks inside one more residual). Inputs, masks and the
    one-hot modality code are as in :class:`MultiModalityPerceiver`.

    Args:
        modalities, depth, cross_heads, latent_heads, cross_dim_head, latent_dim_head, attn_dropout, ff_dropout,
            num_latent_blocks_per_layer, use_gelu: as :class:`MultiModalityPerceiver`.
        num_classes: classifier outputs on the mean of the last layer's latents; ``None`` returns that mean
            ``[B, D_last]`` (the fork crashes).
        weight_tie_layers: must be False (layers differ in width; the fork refuses too).
        configurator: a :class:`HierarchicalConfigurator` with ``configurator.depth >= depth``.

    The state dict holds ``latents.{i}``, ``cross_blocks.{i}`` and ``latent_blocks.{i · blocks + j}``.
    """

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        num_classes: int | None = None,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = False,
        configurator: HierarchicalConfigurator,
    ) -> None:
        super().__init__(modalities, depth)
        if weight_tie_layers:
            raise ValueError("HierarchicalMultiModalityPerceiver cannot tie weights: its layers differ in width "
                             "(got weight_tie_layers=True)")
        if not isinstance(configurator, HierarchicalConfigurator):
            raise TypeError(f"configurator must be a HierarchicalConfigurator, got {type(configurator).__name__}")
        if not 1 <= depth <= configurator.depth:
            raise ValueError(f"depth must be in [1, configurator.depth={configurator.depth}], got {depth}")
        self.configurator = configurator
        sizes = [(configurator.get_num_latents(i), configurator.get_latent_dim(i)) for i in range(depth)]
        for i in range(1, depth):
            if sizes[i][0] > sizes[i - 1][0]:
                raise ValueError(f"layer {i} has more latents ({sizes[i][0]}) than layer {i - 1} ({sizes[i - 1][0]}); "
                                 "a hierarchical Perceiver's latent count must not grow")
        self.latent_sizes: tuple[tuple[int, int], ...] = tuple(sizes)
        self.latents = nn.ParameterList(nn.Parameter(torch.randn(n, d)) for n, d in sizes)
        activation = "gelu" if use_gelu else "geglu"
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(
                d, self.context_dim, num_heads=cross_heads, qk_channels=cross_heads * cross_dim_head,
                qkv_bias=False, query_residual=True, mlp_mult=4, activation=activation,
                attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            )
            for _, d in sizes
        )
        self.latent_order = latent_block_schedule(depth, num_latent_blocks_per_layer, False)
        self.latent_blocks = nn.ModuleList(
            SelfAttentionBlock(
                d, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=False,
                mlp_mult=4, activation=activation, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            )
            for _, d in sizes
            for _ in range(num_latent_blocks_per_layer)
        )
        last = sizes[-1][1]
        self.head = (
            nn.Sequential(OrderedDict(norm=nn.LayerNorm(last), proj=Linear(last, num_classes)))
            if num_classes is not None
            else None
        )

    def encode(self, contexts: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        """Run the layers over the shared context ``[B, M, context_dim]`` → last latents ``[B, N_last, D_last]``."""
        (context,) = contexts
        b = context.shape[0]
        x = None
        for i, block in enumerate(self.cross_blocks):
            latents = per_sample(self.latents[i].to(context.dtype), b)  # [B, N_i, D_i]
            if x is not None:
                n, d = latents.shape[1:]
                latents = latents + F.pad(x, (0, d - x.shape[-1]))[:, :n]  # previous output: zero-pad width, keep N_i
            x = block(latents, context, mask=mask)
            h = x
            for j in self.latent_order[i]:
                h = self.latent_blocks[j](h)
            x = x + h  # the fork's outer residual around its latent transformer
        return x


@configurable
class HierarchicalMultiModalityPerceiverNoPooling(HierarchicalMultiModalityPerceiver):
    """:class:`HierarchicalMultiModalityPerceiver` that returns the last latents ``[B, N_last, D_last]`` (no head).

    As in the fork, the default feed-forward is GELU. ``num_latents`` and ``latent_dim`` are accepted for
    compatibility with the fork (which ignores them); when given they must equal the configurator's first sizes.
    """

    def __init__(
        self,
        *,
        modalities: Iterable[InputModality],
        depth: int,
        num_latents: int | None = None,
        latent_dim: int | None = None,
        cross_heads: int = 1,
        latent_heads: int = 8,
        cross_dim_head: int = 64,
        latent_dim_head: int = 64,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        num_latent_blocks_per_layer: int = 1,
        use_gelu: bool = True,
        configurator: HierarchicalConfigurator,
    ) -> None:
        for name, value, begin in (("num_latents", num_latents, getattr(configurator, "num_latents_begin", None)),
                                   ("latent_dim", latent_dim, getattr(configurator, "latent_dim_begin", None))):
            if value is not None and value != begin:
                raise ValueError(f"{name}={value} disagrees with the configurator ({name}_begin={begin}); the "
                                 "configurator sets the latent sizes (leave it out)")
        super().__init__(
            modalities=modalities, depth=depth, cross_heads=cross_heads, latent_heads=latent_heads,
            cross_dim_head=cross_dim_head, latent_dim_head=latent_dim_head, num_classes=None,
            attn_dropout=attn_dropout, ff_dropout=ff_dropout, weight_tie_layers=weight_tie_layers,
            num_latent_blocks_per_layer=num_latent_blocks_per_layer, use_gelu=use_gelu, configurator=configurator,
        )

    def pool(self, x: Tensor) -> Tensor:
        return x
