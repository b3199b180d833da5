"""transformers' generic Perceiver API: ``PerceiverConfig``, ``PerceiverModel`` and its building blocks.

Code that assembles its own Perceiver IO from transformers' pieces runs on ours with the import changed::

    config = PerceiverConfig(num_latents=32, d_latents=64, num_labels=10)
    model = PerceiverModel(config, input_preprocessor=PerceiverImagePreprocessor(config, prep_type="conv1x1", ...),
                           decoder=PerceiverClassificationDecoder(config, num_channels=64, ...))
    out = model(inputs=pixel_values, output_attentions=True)

Every block takes transformers' constructor arguments and *is* one of our components (a subclass of
:class:`~perceivers.io.processors.ImagePreprocessor`, :class:`~perceivers.io.BasicDecoder`, …), so the
model is a :class:`~perceivers.io.PerceiverIOModel` with our tensor names. Each block knows how its
tensors are named in transformers (``transformers_rules()``, assembled from the key pieces of
:mod:`perceivers.convert.transformers`), so :meth:`PerceiverModel.load_transformers_state_dict` and
:meth:`PerceiverModel.transformers_state_dict` exchange weights with a transformers ``PerceiverModel``
built from the same blocks.

Computation follows DeepMind's official code (tanh GELU, TF-"SAME" conv stem) unless
``PerceiverModel(..., numerics="transformers")``, which reproduces transformers (``config.hidden_act``,
its conv stem). See docs/transformers-api.md for what is not supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .convert.state_dict import CheckpointError, adopt_checkpoint_dtype, load_state_dict_strict
from .convert.transformers import (
    CONV1X1_RULES,
    CONV_RULES,
    ENCODER_RULES,
    MASK_RULES,
    PADDING_RULES,
    PATCHES_LINEAR_RULES,
    POSTPROCESSOR_RULES,
    TEXT_RULES,
    Rule,
    decoder_rules,
    position_rules,
    rename_state_dict,
    under,
    use_transformers_numerics,
)
from .hf_config import PerceiverConfig
from .io import (
    BasicDecoder,
    ClassificationDecoder,
    FlowDecoder,
    FourierQueries,
    InputQueries,
    MultimodalDecoder,
    PerceiverIOModel,
    ProjectedPositions,
    ProjectionDecoder,
    TrainableGridPositions,
    TrainableQueries,
    VideoAutoencodingDecoder,
)
from .io.processors import (
    AudioPostprocessor,
    AudioPreprocessor,
    ClassificationPostprocessor,
    EmbeddingDecoder,
    ImagePreprocessor,
    MultimodalPostprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    ProjectionPostprocessor,
    TextPreprocessor,
)
from .layers import FourierPositionEncoding, TrainablePositionEncoding
from .outputs import TransformersIndexing, model_output
from .tasks.common import TrunkConfig, build_encoder, check_unsupported, output_flags, set_attention_dropout
from .validation import check_count

__all__ = [
    "PerceiverAudioPostprocessor",
    "PerceiverAudioPreprocessor",
    "PerceiverBasicDecoder",
    "PerceiverBasicVideoAutoencodingDecoder",
    "PerceiverClassificationDecoder",
    "PerceiverClassificationPostprocessor",
    "PerceiverConfig",
    "PerceiverEmbeddingDecoder",
    "PerceiverImagePreprocessor",
    "PerceiverModel",
    "PerceiverModelOutput",
    "PerceiverMultimodalDecoder",
    "PerceiverMultimodalPostprocessor",
    "PerceiverMultimodalPreprocessor",
    "PerceiverOneHotPreprocessor",
    "PerceiverOpticalFlowDecoder",
    "PerceiverProjectionDecoder",
    "PerceiverProjectionPostprocessor",
    "PerceiverTextPreprocessor",
]

def _config(config: Any) -> PerceiverConfig:
    return PerceiverConfig.coerce(config)


# ------------------------------------------------------------------------------------- position encodings


def _index_shape(index_dims: Any) -> tuple[int, ...]:
    return (int(index_dims),) if isinstance(index_dims, int) else tuple(int(n) for n in index_dims)


class _InterpolatedGridPositions(TrainableGridPositions):
    """A learned position table that, while ``interpolate`` is set, is resized bicubically to another 2-D grid
    (transformers' ``interpolate_pos_encoding``: the table is read as a square grid).

    Otherwise it is read as transformers does, as flat rows: any index shape with as many positions is
    accepted (transformers' ``index_dims`` is usually the flattened ``H·W`` of an ``(H, W)`` input).
    """

    interpolate = False

    def forward(self, index_shape, *, device=None, dtype=None) -> Tensor:
        if not self.interpolate or len(index_shape) != 2:
            if math.prod(index_shape) != math.prod(self.index_shape):  # raises, naming both shapes
                return super().forward(index_shape, device=device, dtype=dtype)
            table = self.table.embeddings
            return table if dtype is None else table.to(dtype)
        table = self.table.embeddings  # [N, C]
        side = math.isqrt(table.shape[0])
        if tuple(index_shape) != (side, side):
            grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, s, s]
            grid = nn.functional.interpolate(grid, size=tuple(index_shape), mode="bicubic", align_corners=False)
            table = grid.flatten(2)[0].t()  # [h·w, C]
        return table if dtype is None else table.to(dtype)


def _position_encoding(
    position_encoding_type: str,
    *,
    out_channels: int | None,
    project_pos_dim: int = -1,
    trainable_position_encoding_kwargs: Mapping[str, Any] | None = None,
    fourier_position_encoding_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """transformers' ``build_position_encoding`` arguments → one of our position modules (optionally projected).

    transformers projects with ``Linear(out_channels, project_pos_dim)``, so the encoding must be
    ``out_channels`` wide for a projection to apply; this is checked here (transformers fails at run time).
    """
    if position_encoding_type == "trainable":
        if not trainable_position_encoding_kwargs:
            raise ValueError("position_encoding_type='trainable' needs trainable_position_encoding_kwargs "
                             "(index_dims, num_channels)")
        kw = dict(trainable_position_encoding_kwargs)
        enc: nn.Module = _InterpolatedGridPositions(_index_shape(kw.pop("index_dims")), int(kw.pop("num_channels", 128)))
    elif position_encoding_type == "fourier":
        if not fourier_position_encoding_kwargs:
            raise ValueError("position_encoding_type='fourier' needs fourier_position_encoding_kwargs "
                             "(num_bands, max_resolution, concat_pos, sine_only)")
        kw = dict(fourier_position_encoding_kwargs)
        res = tuple(kw.pop("max_resolution"))
        enc = FourierPositionEncoding(len(res), int(kw.pop("num_bands")), res, layout="deepmind",
                                      concat_pos=kw.pop("concat_pos", True), sine_only=kw.pop("sine_only", False))
    else:
        raise ValueError(f"position_encoding_type must be 'trainable' or 'fourier', got {position_encoding_type!r}")
    if kw:
        raise TypeError(f"unexpected {position_encoding_type} position encoding arguments {sorted(kw)}")
    if project_pos_dim > 0:
        if out_channels != enc.num_channels:
            raise ValueError(f"project_pos_dim projects out_channels={out_channels} channels (transformers' Linear), "
                             f"but the {position_encoding_type} positions have {enc.num_channels}")
        enc = ProjectedPositions(enc, project_pos_dim)
    return enc


def _position_rules(enc: nn.Module | None) -> list[Rule]:
    if enc is None:
        return []
    projected = isinstance(enc, ProjectedPositions)
    base = enc.base if projected else enc
    return position_rules(trainable=isinstance(base, TrainableGridPositions), projected=projected)


def _split_position_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - {"trainable_position_encoding_kwargs", "fourier_position_encoding_kwargs"}
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    return kwargs


# ----------------------------------------------------------------------------------------- preprocessors


class PerceiverTextPreprocessor(TextPreprocessor):
    """transformers' text preprocessor: ``config.vocab_size`` embeddings + ``config.max_position_embeddings``
    learned positions, ``config.d_model`` wide → :class:`~perceivers.io.processors.TextPreprocessor`."""

    def __init__(self, config: Any) -> None:
        c = _config(config)
        super().__init__(c.vocab_size, c.d_model, c.max_position_embeddings)
        self.config = c

    def transformers_rules(self) -> list[Rule]:
        return list(TEXT_RULES)


class PerceiverImagePreprocessor(ImagePreprocessor):
    """transformers' image / video preprocessor → :class:`~perceivers.io.processors.ImagePreprocessor`.

    Arguments as transformers'. ``prep_type="conv"`` is one 7×7/2 conv + max-pool (4× downsampling)
    whatever ``spatial_downsample`` (1 or 4), as transformers builds it. Refused (``ValueError``), where
    transformers computes something else than its ``num_channels`` says: ``"pixels"`` with
    ``spatial_downsample > 1`` on images (transformers strides the batch and channel axes), and
    ``conv_after_patching`` with another ``prep_type`` than ``"patches"``. With ``conv_after_patching`` the
    input channels are ``conv_after_patching_in_channels / (spatial_downsample² · temporal_downsample)``
    (transformers sizes its ``Linear`` so and ignores ``in_channels``).
    """

    def __init__(
        self,
        config: Any,
        prep_type: str = "conv",
        spatial_downsample: int = 4,
        temporal_downsample: int = 1,
        position_encoding_type: str = "fourier",
        in_channels: int = 3,
        out_channels: int = 64,
        conv_after_patching: bool = False,
        conv_after_patching_in_channels: int = 54,
        conv2d_use_batchnorm: bool = True,
        concat_or_add_pos: str = "concat",
        project_pos_dim: int = -1,
        **position_encoding_kwargs: Any,
    ) -> None:
        if prep_type not in ("conv", "conv1x1", "patches", "pixels"):
            raise ValueError(f"prep_type must be 'conv', 'conv1x1', 'patches' or 'pixels', got {prep_type!r}")
        check_count(spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample)
        pos = _position_encoding(position_encoding_type, out_channels=out_channels, project_pos_dim=project_pos_dim,
                                 **_split_position_kwargs(position_encoding_kwargs))
        base = getattr(pos, "base", pos)  # transformers: video when the positions have 3 axes
        temporal = (base.num_dims if isinstance(base, FourierPositionEncoding) else len(base.index_shape)) > 2
        if prep_type == "conv":
            if spatial_downsample not in (1, 4) or temporal_downsample != 1:
                raise ValueError("prep_type='conv' is one 4x downsampling layer in transformers: spatial_downsample "
                                 f"must be 1 or 4 and temporal_downsample 1, got {spatial_downsample}, {temporal_downsample}")
            spatial_downsample = 4
        if prep_type == "pixels" and spatial_downsample > 1 and not temporal:
            raise ValueError("prep_type='pixels' with spatial_downsample > 1 on images is not supported: transformers "
                             "strides the batch and channel axes there; use spatial_downsample=1 or 'patches'")
        if conv_after_patching and prep_type != "patches":
            raise ValueError(f"conv_after_patching applies to prep_type='patches' only, got {prep_type!r}")
        if conv_after_patching:  # transformers sizes the Linear by conv_after_patching_in_channels, not in_channels
            block = spatial_downsample**2 * temporal_downsample
            if conv_after_patching_in_channels % block:
                raise ValueError(f"conv_after_patching_in_channels={conv_after_patching_in_channels} is not a whole "
                                 f"number of {spatial_downsample}x{spatial_downsample}x{temporal_downsample} patches")
            in_channels = conv_after_patching_in_channels // block
        elif prep_type == "patches" and temporal_downsample != 1 and not temporal:
            raise ValueError("prep_type='patches' with temporal_downsample > 1 needs 3-D (video) positions or "
                             "conv_after_patching (transformers counts the frames only then)")
        super().__init__(prep_type, in_channels=in_channels, position_encoding=pos,
                         spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample,
                         num_channels=out_channels, conv_after_patching=conv_after_patching,
                         concat_or_add_pos=concat_or_add_pos, use_batchnorm=conv2d_use_batchnorm)
        self.config = _config(config)

    def transformers_rules(self) -> list[Rule]:
        stem = {"conv": CONV_RULES, "conv1x1": CONV1X1_RULES}.get(self.prep_type, [])
        return [*stem, *(PATCHES_LINEAR_RULES if self.conv_after_patching else []),
                *_position_rules(self.position_encoding)]


class PerceiverOneHotPreprocessor(OneHotPreprocessor):
    """transformers' one-hot (label) preprocessor: ``[B, config.num_labels]`` → one token."""

    def __init__(self, config: Any) -> None:
        c = _config(config)
        super().__init__(c.num_labels)
        self.config = c

    def transformers_rules(self) -> list[Rule]:
        return []


class PerceiverAudioPreprocessor(AudioPreprocessor):
    """transformers' audio preprocessor (patches of ``samples_per_patch`` samples + positions) →
    :class:`~perceivers.io.processors.AudioPreprocessor`."""

    def __init__(
        self,
        config: Any,
        prep_type: str = "patches",
        samples_per_patch: int = 96,
        position_encoding_type: str = "fourier",
        concat_or_add_pos: str = "concat",
        out_channels: int = 64,
        project_pos_dim: int = -1,
        **position_encoding_kwargs: Any,
    ) -> None:
        if prep_type != "patches":
            raise ValueError(f"prep_type must be 'patches' (the only audio preprocessing), got {prep_type!r}")
        if concat_or_add_pos not in ("concat", "add"):
            raise ValueError(f"concat_or_add_pos must be 'concat' or 'add', got {concat_or_add_pos!r}")
        pos = _position_encoding(position_encoding_type, out_channels=out_channels, project_pos_dim=project_pos_dim,
                                 **_split_position_kwargs(position_encoding_kwargs))
        if concat_or_add_pos == "add" and pos.num_channels != samples_per_patch:
            raise ValueError(f"concat_or_add_pos='add' needs positions as wide as samples_per_patch={samples_per_patch}, "
                             f"got {pos.num_channels}")
        super().__init__(samples_per_patch, position_encoding=pos, concat_or_add_pos=concat_or_add_pos)
        self.config = _config(config)

    def transformers_rules(self) -> list[Rule]:
        return _position_rules(self.position_encoding)


def _rules_of(module: nn.Module, where: str) -> list[Rule]:
    """``module.transformers_rules()``; a module of ours without it may hold no tensors."""
    rules = getattr(module, "transformers_rules", None)
    if rules is not None:
        return rules()
    if module.state_dict():
        raise TypeError(f"{where} is a {type(module).__name__}, which has no transformers counterpart; build it "
                        "from perceivers.hf's Perceiver* blocks to exchange weights with transformers")
    return []


class PerceiverMultimodalPreprocessor(MultimodalPreprocessor):
    """transformers' multimodal preprocessor → :class:`~perceivers.io.processors.MultimodalPreprocessor`.

    ``mask_probs`` may name some modalities only (mask tokens for those). Probabilities 0 and 1 give
    transformers' result exactly; in between, which tokens are masked is random (another generator).
    """

    def __init__(self, modalities: Mapping[str, nn.Module], mask_probs: Mapping[str, float] | None = None,
                 min_padding_size: int = 2) -> None:
        super().__init__(modalities, mask_probs=None, min_padding_size=min_padding_size)
        probs = dict(mask_probs or {})
        unknown = set(probs) - set(self.modality_names)
        if unknown:
            raise ValueError(f"mask_probs names unknown modalities {sorted(unknown)}; known: {self.modality_names}")
        self.min_padding_size = min_padding_size
        if probs:
            self.mask_probs = {m: float(p) for m, p in probs.items()}
            self.mask_tokens = nn.ModuleDict({m: TrainablePositionEncoding(1, self.num_channels) for m in sorted(probs)})

    def transformers_rules(self) -> list[Rule]:
        rules = [*PADDING_RULES, *MASK_RULES]
        for m in self.modality_names:
            rules += under(f"modalities.{m}.", f"modalities.{m}.", _rules_of(self.modalities[m], f"modality {m!r}"))
        return rules


# -------------------------------------------------------------------------------------------- decoders


class PerceiverBasicDecoder(BasicDecoder):
    """transformers' cross-attention decoder → :class:`~perceivers.io.BasicDecoder`.

    Arguments as transformers'. Queries: a learned table (``"trainable"``), Fourier features of
    ``output_index_dims`` (``"fourier"``) or none (``"none"``: given by a multimodal decoder). With
    ``position_encoding_only=True`` the module only builds queries (for :class:`PerceiverMultimodalDecoder`).
    ``num_channels`` must equal the query width (transformers fails at run time otherwise); with
    ``concat_preprocessed_input`` it includes the preprocessor's feature channels.

    Not supported: ``project_pos_dim`` on decoder queries.
    """

    def __init__(
        self,
        config: Any,
        output_num_channels: int,
        position_encoding_type: str | None = "trainable",
        output_index_dims: Any = None,
        num_channels: int | None = 128,
        subsampled_index_dims: Any = None,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        num_heads: int | None = 1,
        widening_factor: int | None = 1,
        use_query_residual: bool | None = False,
        concat_preprocessed_input: bool | None = False,
        final_project: bool | None = True,
        position_encoding_only: bool | None = False,
        **position_encoding_kwargs: Any,
    ) -> None:
        c = _config(config)
        if position_encoding_kwargs.pop("project_pos_dim", -1) > 0:
            raise ValueError("project_pos_dim on decoder queries is not supported")
        position_encoding_kwargs.pop("out_channels", None)
        queries = self._queries(position_encoding_type, output_index_dims, _split_position_kwargs(position_encoding_kwargs))
        query_width = None if queries is None else queries.num_channels
        if position_encoding_only:
            if queries is None:
                raise ValueError("position_encoding_only needs queries: position_encoding_type 'trainable' or 'fourier'")
            num_channels = query_width
        elif queries is not None and (num_channels < query_width
                                      or (not concat_preprocessed_input and num_channels != query_width)):
            raise ValueError(f"num_channels={num_channels} must equal the query width: the {position_encoding_type} "
                             f"queries have {query_width} channels"
                             + (" plus the preprocessor's features" if concat_preprocessed_input else ""))
        if qk_channels is None:  # transformers: the cross-attention's default q/k width per the config
            qk_channels = num_channels if c.cross_attention_shape_for_attention == "q" else c.d_latents
        extra = 0 if queries is None or not concat_preprocessed_input else num_channels - query_width
        super().__init__(
            queries, latent_channels=c.d_latents, query_channels=num_channels,
            output_channels=output_num_channels if final_project else None, num_heads=num_heads,
            qk_channels=qk_channels, v_channels=v_channels, use_query_residual=use_query_residual,
            widening_factor=widening_factor, concat_preprocessed_input=bool(concat_preprocessed_input),
            preprocessed_channels=extra,
        )
        self.preprocessed_channels = extra
        self.position_encoding_type = position_encoding_type
        self.output_index_dims = output_index_dims
        self.output_num_channels = output_num_channels
        self.position_encoding_only = bool(position_encoding_only)
        if position_encoding_only:  # a query source only
            self.cross_attention = None
            self.output = None
        self.config = c

    @staticmethod
    def _queries(kind: str | None, output_index_dims: Any, kwargs: Mapping[str, Any]) -> nn.Module | None:
        if kind == "none":
            return None
        if kind == "trainable":
            kw = dict(kwargs.get("trainable_position_encoding_kwargs") or {})
            if not kw:
                raise ValueError("position_encoding_type='trainable' needs trainable_position_encoding_kwargs "
                                 "(index_dims, num_channels)")
            return TrainableQueries(math.prod(_index_shape(kw["index_dims"])), int(kw.get("num_channels", 128)))
        if kind == "fourier":
            kw = dict(kwargs.get("fourier_position_encoding_kwargs") or {})
            if not kw:
                raise ValueError("position_encoding_type='fourier' needs fourier_position_encoding_kwargs")
            if output_index_dims is None:
                raise ValueError("Fourier decoder queries need output_index_dims (the output grid)")
            return FourierQueries(_index_shape(output_index_dims), int(kw["num_bands"]), tuple(kw["max_resolution"]),
                                  concat_pos=kw.get("concat_pos", True), sine_only=kw.get("sine_only", False))
        raise ValueError(f"position_encoding_type must be 'trainable', 'fourier' or 'none', got {kind!r}")

    @property
    def num_query_channels(self) -> int:
        """transformers' property: the query width (with ``position_encoding_only``), else the output width."""
        if self.position_encoding_only:
            return self.queries.num_channels
        return self.output_channels

    def forward(self, query: Tensor, latents: Tensor, *, query_mask: Tensor | None = None,
                head: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        if self.position_encoding_only:
            raise ValueError("this decoder was built with position_encoding_only=True: it only builds queries")
        return super().forward(query, latents, query_mask=query_mask, head=head)

    def transformers_rules(self) -> list[Rule]:
        if self.position_encoding_only:
            return decoder_rules(final_layer=False)[:1] if isinstance(self.queries, TrainableQueries) else []
        return decoder_rules(queries=isinstance(self.queries, TrainableQueries), final_layer=self.output is not None)


class PerceiverClassificationDecoder(ClassificationDecoder):
    """transformers' classification decoder: one query → ``config.num_labels`` logits
    (:class:`~perceivers.io.ClassificationDecoder` around a :class:`PerceiverBasicDecoder`)."""

    def __init__(self, config: Any, **decoder_kwargs: Any) -> None:
        nn.Module.__init__(self)
        c = _config(config)
        self.num_labels = self.num_classes = c.num_labels
        self.decoder = PerceiverBasicDecoder(c, output_num_channels=c.num_labels, output_index_dims=1, **decoder_kwargs)
        self.query_channels = self.decoder.query_channels
        self.output_channels = c.num_labels

    @property
    def num_query_channels(self) -> int:
        return self.decoder.num_query_channels

    def transformers_rules(self) -> list[Rule]:
        return under("decoder.", "decoder.", self.decoder.transformers_rules())


class PerceiverProjectionDecoder(ProjectionDecoder):
    """transformers' projection decoder: mean of the latents → ``Linear`` to ``config.num_labels``."""

    def __init__(self, config: Any) -> None:
        c = _config(config)
        super().__init__(c.num_labels, latent_channels=c.d_latents)

    def transformers_rules(self) -> list[Rule]:
        return [("classifier.{p}", "logits.{p}")]


class PerceiverOpticalFlowDecoder(FlowDecoder):
    """transformers' optical-flow decoder: the preprocessed inputs are the queries (``num_channels`` = the
    preprocessor's width) → ``[B, H, W, output_num_channels]`` divided by ``rescale_factor``. The query
    position arguments (``position_encoding_type`` …) are accepted and unused, as in transformers
    (``"trainable"`` is refused: it would add an unused table)."""

    def __init__(self, config: Any, output_image_shape: Any, output_num_channels: int = 2,
                 rescale_factor: float = 100.0, **decoder_kwargs: Any) -> None:
        nn.Module.__init__(self)
        kind = decoder_kwargs.pop("position_encoding_type", "trainable")
        if kind not in ("fourier", "none"):
            raise ValueError(f"the flow decoder's queries are its inputs: position_encoding_type must be 'fourier' or "
                             f"'none' (unused), got {kind!r}")
        decoder_kwargs.pop("fourier_position_encoding_kwargs", None)
        self.decoder = PerceiverBasicDecoder(config, output_num_channels=output_num_channels,
                                             position_encoding_type="none", **decoder_kwargs)
        self.decoder.queries = InputQueries(self.decoder.query_channels)
        self.output_image_shape = tuple(int(n) for n in output_image_shape)
        self.rescale_factor = float(rescale_factor)
        self.query_channels, self.output_channels = self.decoder.query_channels, output_num_channels
        self.output_num_channels = output_num_channels

    def transformers_rules(self) -> list[Rule]:
        return under("decoder.", "decoder.", self.decoder.transformers_rules())


class PerceiverBasicVideoAutoencodingDecoder(VideoAutoencodingDecoder):
    """transformers' video decoder: queries over ``output_shape[1:]`` = ``(T, H, W)`` →
    ``[B, T, H, W, output_num_channels]`` (``[B, Q, C]`` when subsampled). Usually a query source of a
    :class:`PerceiverMultimodalDecoder` (``position_encoding_only=True``)."""

    def __init__(self, config: Any, output_shape: Any, position_encoding_type: str, **decoder_kwargs: Any) -> None:
        nn.Module.__init__(self)
        if len(output_shape) != 4:
            raise ValueError(f"output_shape must be (batch, T, H, W), got {tuple(output_shape)}")
        if "output_num_channels" not in decoder_kwargs:
            raise TypeError("PerceiverBasicVideoAutoencodingDecoder needs output_num_channels")
        self.output_shape = tuple(int(n) for n in output_shape[1:])
        self.decoder = PerceiverBasicDecoder(config, output_index_dims=self.output_shape,
                                             position_encoding_type=position_encoding_type, **decoder_kwargs)
        self.output_num_channels = self.output_channels = decoder_kwargs["output_num_channels"]
        self.query_channels = self.decoder.query_channels

    @property
    def num_query_channels(self) -> int:
        return self.decoder.num_query_channels

    def transformers_rules(self) -> list[Rule]:
        return under("decoder.", "decoder.", self.decoder.transformers_rules())


def _query_source(decoder: nn.Module, name: str) -> nn.Module:
    """The query builder of a modality decoder given to :class:`PerceiverMultimodalDecoder`."""
    inner = decoder if isinstance(decoder, PerceiverBasicDecoder) else getattr(decoder, "decoder", None)
    if not isinstance(inner, PerceiverBasicDecoder) or inner.queries is None:
        raise TypeError(f"modality {name!r}: expected a Perceiver*Decoder with trainable or Fourier queries, got "
                        f"{type(decoder).__name__}")
    if not inner.position_encoding_only:
        raise ValueError(f"modality {name!r}: modality decoders only give queries here; build it with "
                         "position_encoding_only=True")
    if inner.concat_preprocessed_input:
        raise ValueError(f"modality {name!r}: concat_preprocessed_input is not supported in modality decoders")
    return inner


class PerceiverMultimodalDecoder(MultimodalDecoder):
    """transformers' multimodal decoder: each modality decoder (``position_encoding_only=True``) gives
    queries, padded to one width with learned vectors, decoded together →
    :class:`~perceivers.io.MultimodalDecoder`. ``decoder_kwargs`` go to the shared
    :class:`PerceiverBasicDecoder`."""

    def __init__(self, config: Any, modalities: Mapping[str, nn.Module], num_outputs: int | None,
                 output_num_channels: int, min_padding_size: int = 2, subsampled_index_dims: Any = None,
                 **decoder_kwargs: Any) -> None:
        nn.Module.__init__(self)
        if not modalities:
            raise ValueError("PerceiverMultimodalDecoder needs at least one modality")
        c = _config(config)
        sources = {m: _query_source(d, m) for m, d in modalities.items()}
        self.modalities = sorted(modalities)
        self.queries = nn.ModuleDict({m: sources[m].queries for m in self.modalities})
        self._rules = {m: _rules_of(modalities[m], f"modality {m!r}") for m in self.modalities}
        self.query_channels = max(q.num_channels for q in self.queries.values()) + min_padding_size
        self.padding = nn.ModuleDict({m: TrainablePositionEncoding(1, self.query_channels - self.queries[m].num_channels)
                                      for m in self.modalities})
        decoder_kwargs.pop("concat_preprocessed_input", None)  # meaningless without queries of its own
        self.decoder = PerceiverBasicDecoder(c, output_num_channels=output_num_channels, position_encoding_type="none",
                                             output_index_dims=(num_outputs,), num_channels=self.query_channels,
                                             **decoder_kwargs)
        self.output_channels = output_num_channels
        self.min_padding_size, self.num_outputs = min_padding_size, num_outputs

    @property
    def num_query_channels(self) -> int:
        return self.query_channels

    def transformers_rules(self) -> list[Rule]:
        rules = [*PADDING_RULES, *under("decoder.", "decoder.", self.decoder.transformers_rules())]
        for m in self.modalities:  # the query tables live under modalities.<m>.… in transformers, queries.<m> here
            for hf, ours in self._rules[m]:
                ours = ours.split("queries.", 1)[-1]
                rules.append((f"modalities.{m}.{hf}", f"queries.{m}.{ours}"))
        return rules


# --------------------------------------------------------------------------------------- postprocessors


class PerceiverClassificationPostprocessor(ClassificationPostprocessor):
    """``Linear(in_channels → config.num_labels)`` on the first query → ``[B, num_labels]``."""

    def __init__(self, config: Any, in_channels: int) -> None:
        super().__init__(in_channels, _config(config).num_labels)

    def transformers_rules(self) -> list[Rule]:
        return list(POSTPROCESSOR_RULES)


class PerceiverAudioPostprocessor(AudioPostprocessor):
    """``Linear(in_channels → config.samples_per_patch)`` per query → waveform ``[B, Q · samples_per_patch]``."""

    def __init__(self, config: Any, in_channels: int, postproc_type: str = "patches") -> None:
        if postproc_type != "patches":
            raise ValueError(f"postproc_type must be 'patches', got {postproc_type!r}")
        super().__init__(in_channels, _config(config).samples_per_patch)

    def transformers_rules(self) -> list[Rule]:
        return list(POSTPROCESSOR_RULES)


class PerceiverProjectionPostprocessor(ProjectionPostprocessor):
    """``Linear(in_channels → out_channels)`` per query."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)

    def transformers_rules(self) -> list[Rule]:
        return list(POSTPROCESSOR_RULES)


class PerceiverMultimodalPostprocessor(MultimodalPostprocessor):
    """Split the decoder output by modality (sorted) and postprocess each; with ``input_is_dict`` the
    input is already ``{modality: tensor}``."""

    def __init__(self, modalities: Mapping[str, nn.Module], input_is_dict: bool = False) -> None:
        super().__init__(modalities)
        self.input_is_dict = input_is_dict

    def forward(self, x: Tensor | Mapping[str, Tensor], *, modality_sizes: Mapping[str, int] | None = None
                ) -> dict[str, Tensor]:
        if self.input_is_dict:
            return {m: self.modalities[m](x[m]) for m in self.modalities}
        if modality_sizes is None:
            raise ValueError("modality_sizes is needed to split a tensor input (input_is_dict=False)")
        return super().forward(x, modality_sizes=modality_sizes)

    def transformers_rules(self) -> list[Rule]:
        rules: list[Rule] = []
        for m in self.modalities:
            rules += under(f"modalities.{m}.", f"modalities.{m}.", _rules_of(self.modalities[m], f"modality {m!r}"))
        return rules


class PerceiverEmbeddingDecoder(EmbeddingDecoder):
    """transformers' tied output layer: ``hidden · Eᵀ + bias`` (``config.vocab_size`` logits).

    ``embedding_layer`` is the input ``nn.Embedding`` (transformers' argument) or its weight.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(_config(config).vocab_size)

    def forward(self, hidden_states: Tensor, embedding_layer: nn.Embedding | Tensor) -> Tensor:  # type: ignore[override]
        weight = embedding_layer.weight if isinstance(embedding_layer, nn.Module) else embedding_layer
        return super().forward(hidden_states, weight)

    def transformers_rules(self) -> list[Rule]:
        return [("bias", "bias")]


# ----------------------------------------------------------------------------------------------- model


@model_output
@dataclass
class PerceiverModelOutput(TransformersIndexing):
    """transformers' ``PerceiverModelOutput``: ``logits`` (``None`` without a decoder; a dict per modality
    with a multimodal postprocessor), the latents ``last_hidden_state [B, N, D]`` and, on request,
    ``hidden_states``, ``attentions`` and ``cross_attentions`` (encoder, then decoder). Indexes like
    transformers' ``ModelOutput``."""

    _transformers_fields: ClassVar[tuple[str, ...]] = ("logits", "last_hidden_state", "hidden_states",
                                                        "attentions", "cross_attentions")

    logits: Any
    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


def _latent_width(decoder: nn.Module) -> int | None:
    if isinstance(decoder, ProjectionDecoder):
        return decoder.logits.in_features
    inner = decoder if isinstance(decoder, BasicDecoder) else getattr(decoder, "decoder", None)
    return getattr(inner, "latent_channels", None)


class PerceiverModel(PerceiverIOModel):
    """transformers' ``PerceiverModel(config, decoder, input_preprocessor, output_postprocessor)``.

    A :class:`~perceivers.io.PerceiverIOModel` whose encoder is sized by ``config`` (the latents
    ``[num_latents, d_latents]`` cross-attend the preprocessed inputs, ``config.d_model`` wide without a
    preprocessor). Without a decoder the output is the latents (``logits`` is ``None``).

    Args:
        config: a :class:`PerceiverConfig`, transformers' ``PerceiverConfig`` or a dict.
        decoder, input_preprocessor, output_postprocessor: the ``Perceiver*`` blocks of this module
            (or any of our components with the same methods; only the blocks exchange weights with
            transformers).
        numerics: ``"deepmind"`` (default): DeepMind's computation, tanh GELU in every MLP and the
            TF-"SAME" conv stem; ``"transformers"``: transformers' (``config.hidden_act``, its conv stem
            padding and pooling), equal to transformers' outputs within float rounding. Applied in place to
            the blocks passed in.

    Raises:
        ValueError: a decoder built for another latent width, a flow decoder whose queries are not the
            preprocessor's width, a postprocessor without a decoder, an unknown ``numerics``.
    """

    def __init__(
        self,
        config: Any,
        decoder: nn.Module | None = None,
        input_preprocessor: nn.Module | None = None,
        output_postprocessor: nn.Module | None = None,
        *,
        numerics: str = "deepmind",
    ) -> None:
        if numerics not in ("deepmind", "transformers"):
            raise ValueError(f"numerics must be 'deepmind' or 'transformers', got {numerics!r}")
        c = _config(config)
        channels = c.d_model if input_preprocessor is None else input_preprocessor.num_channels
        if decoder is not None:
            _check_decoder(decoder, c, input_preprocessor, channels)
        trunk = TrunkConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(TrunkConfig)
                               if f.name not in ("dropout", "hidden_act")})
        super().__init__(build_encoder(trunk, channels), decoder, input_preprocessor=input_preprocessor,
                         output_postprocessor=output_postprocessor)
        self.config = c
        self.numerics = numerics
        set_attention_dropout(self, c.attention_probs_dropout_prob)  # transformers: the only dropout
        if numerics == "transformers":
            use_transformers_numerics(self, c.hidden_act)

    @property
    def embeddings(self) -> TrainablePositionEncoding:
        """The latent array (transformers' ``model.embeddings``; ``.embeddings`` is the ``[N, D]`` table)."""
        return self.encoder.latents

    def get_input_embeddings(self) -> nn.Parameter:
        return self.encoder.latents.embeddings

    def forward(  # type: ignore[override]
        self,
        inputs: Tensor | Mapping[str, Tensor],
        attention_mask: Tensor | None = None,
        subsampled_output_points: Tensor | Mapping[str, Tensor | None] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        head_mask: None = None,
    ) -> PerceiverModelOutput | tuple:
        """transformers' call.

        Args:
            inputs: what the preprocessor takes (without one: ``[B, M, config.d_model]``).
            attention_mask: ``[B, M]`` over the preprocessed tokens, 1/True = attend.
            subsampled_output_points: flat output indices to decode: ``{modality: indices or None}`` for a
                multimodal decoder, a tensor for a single decoder.
            output_attentions, output_hidden_states, return_dict: default from ``config``.
            interpolate_pos_encoding: resize the learned position table of an image preprocessor (read as a
                square grid) bicubically to the input's token grid, as transformers; no effect on Fourier
                positions and other preprocessors (as transformers).
            head_mask: only ``None`` is accepted.

        Returns:
            :class:`PerceiverModelOutput`, or with ``return_dict=False`` transformers' tuple
            ``(logits?, last_hidden_state, hidden_states?, attentions?, (encoder cross-attention,)?,
            *decoder cross-attentions)``.
        """
        check_unsupported(head_mask)
        c = self.config
        hidden, attentions, as_dict = output_flags(c, output_hidden_states, output_attentions, return_dict)
        if self.input_preprocessor is None and isinstance(inputs, Tensor) and inputs.shape[-1] != c.d_model:
            raise ValueError(f"inputs have {inputs.shape[-1]} channels but config.d_model is {c.d_model} (without "
                             "an input_preprocessor the inputs must be [batch, tokens, d_model])")
        tables = [m for m in (self.input_preprocessor or nn.Module()).modules()
                  if isinstance(m, _InterpolatedGridPositions)] if interpolate_pos_encoding else []
        try:
            for m in tables:
                m.interpolate = True
            out = super().forward(inputs, input_mask=attention_mask,
                                  subsampled_output_points=subsampled_output_points,
                                  output_hidden_states=hidden, output_attentions=attentions)
        finally:
            for m in tables:
                m.interpolate = False
        result = PerceiverModelOutput(out.logits, out.last_hidden_state, out.hidden_states, out.attentions,
                                      out.cross_attentions)
        if not as_dict:
            cross = result.cross_attentions
            groups = (result.hidden_states, result.attentions, None if cross is None else cross[:1])
            head = (result.last_hidden_state,) if result.logits is None else (result.logits, result.last_hidden_state)
            return (*head, *(g for g in groups if g is not None), *(() if cross is None else cross[1:]))
        return result

    # ------------------------------------------------------------------------------------- weights

    def transformers_rules(self) -> list[Rule]:
        """(transformers, ours) key templates of this model: the trunk's and each block's, under its name."""
        rules = list(ENCODER_RULES)
        for name in ("input_preprocessor", "decoder", "output_postprocessor"):
            module = getattr(self, name)
            if module is not None:
                rules += under(f"{name}.", f"{name}.", _rules_of(module, name))
        return rules

    def load_transformers_state_dict(self, state: Mapping[str, Tensor]) -> PerceiverModel:
        """Load the ``state_dict()`` of a transformers ``PerceiverModel`` built from the same blocks (strict:
        every tensor renamed by a rule, every one of ours given, shapes equal; ``CheckpointError``, a
        ``ValueError``, names what does not fit). The weights are used as stored."""
        converted = rename_state_dict(state, self.transformers_rules(), reverse=False, what="PerceiverModel")
        return load_state_dict_strict(self, converted, source="the transformers PerceiverModel state dict")

    def transformers_state_dict(self) -> dict[str, Tensor]:
        """Our tensors under transformers' names: loads strictly into transformers' ``PerceiverModel``."""
        return rename_state_dict(self.state_dict(), self.transformers_rules(), reverse=True, what="PerceiverModel")

    # ------------------------------------------------------------------------------------- files

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        decoder: nn.Module | None = None,
        input_preprocessor: nn.Module | None = None,
        output_postprocessor: nn.Module | None = None,
        *,
        config: Any = None,
        numerics: str = "deepmind",
        undo_conv_transpose: bool | None = None,
        map_location: str | torch.device = "cpu",
        **hub_options: Any,
    ) -> PerceiverModel:
        """transformers' ``PerceiverModel.from_pretrained``: the trunk (and the given blocks) of any transformers
        Perceiver checkpoint, e.g. a task model's (``perceiver.`` prefix stripped, its head left out).

        As in transformers, checkpoint blocks without a counterpart here (a task head, a block not passed)
        are skipped and a block passed here that the checkpoint lacks keeps its initialisation; both are
        reported in one warning. The trunk must be complete, and a block present on both sides must fit
        it exactly.

        Args:
            name_or_path: a transformers checkpoint directory or Hub repo id (``revision``, ``cache_dir``,
                ``local_files_only``, ``token`` in ``hub_options``; offline-capable through the HF cache).
            decoder, input_preprocessor, output_postprocessor: as in the constructor.
            config: overrides the checkpoint's ``config.json`` (ours, transformers' or a dict).
            numerics: as in the constructor.
            undo_conv_transpose: swap H/W of a conv stem's 7×7 kernel back (transformers stores the official
                kernel transposed); default True with DeepMind numerics, as :func:`perceivers.from_pretrained`.

        Raises:
            CheckpointError: the trunk's or a shared block's tensors are missing, unexpected or mis-shaped.
            FileNotFoundError: not a local directory and not fetchable from the Hub.
        """
        from .convert.transformers import read_transformers_checkpoint
        from .hub import resolve

        directory = resolve(name_or_path, **hub_options)
        cfg, state = read_transformers_checkpoint(directory, map_location=map_location)
        model = cls(PerceiverConfig.from_dict(cfg) if config is None else config, decoder, input_preprocessor,
                    output_postprocessor, numerics=numerics)
        skipped: list[str] = []
        if any(k.startswith(_BASE_PREFIX) for k in state):  # a task model's: its head sits beside the prefix
            skipped = sorted({k.split(".", 1)[0] for k in state if not k.startswith(_BASE_PREFIX)})
            state = {k[len(_BASE_PREFIX):]: v for k, v in state.items() if k.startswith(_BASE_PREFIX)}
        blocks = ("input_preprocessor", "decoder", "output_postprocessor")
        rules, what = model.transformers_rules(), f"PerceiverModel from {directory}"
        groups: dict[str, dict[str, Tensor]] = {}
        for k, v in state.items():
            groups.setdefault(k.split(".", 1)[0] if k.split(".", 1)[0] in blocks else "", {})[k] = v
        converted = rename_state_dict(groups.pop("", {}), rules, reverse=False, what=what)  # the trunk: strict
        for name, tensors in groups.items():
            try:  # transformers' rule: a block of another kind (its names differ) is skipped, not an error
                if getattr(model, name) is None:
                    raise CheckpointError(name)
                converted.update(rename_state_dict(tensors, rules, reverse=False, what=what))
            except CheckpointError:
                skipped.append(name)
        swap = numerics == "deepmind" if undo_conv_transpose is None else undo_conv_transpose
        kernel = "input_preprocessor." + CONV_RULES[0][1]
        if swap and kernel in converted:
            converted[kernel] = converted[kernel].transpose(-1, -2).contiguous()
        loaded = {k.split(".", 1)[0] for k in converted}
        fresh = sorted(b for b in blocks if getattr(model, b) is not None and b not in loaded)
        adopt_checkpoint_dtype(model, converted)  # the checkpoint's dtype, as transformers' dtype="auto"
        own = model.state_dict()
        converted.update({k: v for k, v in own.items() if k.split(".", 1)[0] in fresh})
        load_state_dict_strict(model, converted, source=str(directory))
        notes = ([f"not used from the checkpoint: {', '.join(skipped)}"] if skipped else []) + (
            [f"not in the checkpoint, left as initialised: {', '.join(fresh)}"] if fresh else [])
        if notes:
            warnings.warn(f"PerceiverModel.from_pretrained({os.fspath(name_or_path)!r}): {'; '.join(notes)}",
                          stacklevel=2)
        return model.to(map_location).eval()

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """transformers' format: ``config.json`` (``architectures: ["PerceiverModel"]``) and
        ``model.safetensors`` under transformers' names, which transformers' ``PerceiverModel.from_pretrained``
        loads with the same blocks (and ours too). With DeepMind numerics a conv stem's 7×7 kernel is stored
        H/W-swapped, as transformers stores the official one and as :meth:`from_pretrained` swaps it back."""
        from .convert.state_dict import save_state_dict
        from .hub import _make_directory
        from .safe_files import atomic_write_text

        directory = _make_directory(save_directory)
        cfg = {**self.config.to_dict(), "architectures": ["PerceiverModel"]}
        state = self.transformers_state_dict()
        kernel = "input_preprocessor." + CONV_RULES[0][0]
        if self.numerics == "deepmind" and kernel in state:
            state[kernel] = state[kernel].transpose(-1, -2).contiguous()
        atomic_write_text(directory / "config.json", json.dumps(cfg, indent=2) + "\n")
        save_state_dict(state, directory / "model.safetensors")
        return directory


#: transformers' ``base_model_prefix`` of the Perceiver: a task checkpoint's trunk and blocks live under it
_BASE_PREFIX = "perceiver."


def _check_decoder(decoder: nn.Module, c: PerceiverConfig, pre: nn.Module | None, channels: int) -> None:
    """The decoder reads ``d_latents``-wide latents, and queries made of the inputs fit the preprocessor."""
    width = _latent_width(decoder)
    if width is not None and width != c.d_latents:
        raise ValueError(f"the decoder attends {width}-channel latents but config.d_latents is {c.d_latents}")
    inner = decoder if isinstance(decoder, BasicDecoder) else getattr(decoder, "decoder", None)
    if isinstance(getattr(inner, "queries", None), InputQueries) and inner.queries.num_channels != channels:
        raise ValueError(f"the decoder's queries are the preprocessed inputs: num_channels={inner.queries.num_channels} "
                         f"but the preprocessor gives {channels}")
    extra = getattr(inner, "preprocessed_channels", 0) if getattr(inner, "concat_preprocessed_input", False) else 0
    features = getattr(pre, "feature_channels", None)
    if extra and features is not None and extra != features:
        raise ValueError(f"concat_preprocessed_input: the decoder's num_channels leaves {extra} channels for the "
                         f"preprocessed inputs, but the preprocessor's features have {features}")
