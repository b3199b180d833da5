"""ImageNet classification: the three official Perceiver IO models (Fourier, conv, learned positions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..io import ClassificationDecoder, PerceiverIOModel, build_position_encoding
from ..io.processors import ImagePreprocessor
from ..io.processors.image import check_conv_padding, conv_stem_size
from ..outputs import TransformersIndexing, model_output
from ..validation import check_count, check_tensor
from .common import (
    LabelNames,
    SavesPretrained,
    TrunkConfig,
    as_pair,
    as_tuple,
    build_encoder,
    check_d_model,
    check_labels,
    check_problem_type,
    check_unsupported,
    classification_loss,
    one_input,
    output_flags,
    set_attention_dropout,
    transformers_tuple,
)
from .pretrained import PretrainedCfg
from .registry import config_from_overrides, register_model

__all__ = ["ImageClassificationConfig", "ImageClassifier", "ImageClassifierOutput"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageClassificationConfig(LabelNames, TrunkConfig):
    """An image classifier: preprocessor, trunk (:class:`TrunkConfig` fields) and a one-query decoder.

    Attributes:
        preprocessing: ``"pixels"``, ``"conv"`` (7×7 conv + max-pool stem) or ``"conv1x1"``.
        position_encoding: ``"fourier"`` or ``"trainable"``.
        image_size: ``(H, W)`` (or one int); fixes the table of trainable positions and sets the
            default Fourier ``max_resolution``; Fourier models accept other sizes at run time.
        in_channels: image channels.
        num_labels: classes.
        spatial_downsample: stem downsampling (4 for ``"conv"``, 1 otherwise).
        preprocessor_channels: output width of the conv / 1×1 conv stem.
        conv_padding: the conv stem's padding: ``"same"`` (DeepMind's TF 'SAME': 56×56 tokens from 224²)
            or ``"symmetric"`` (transformers' port: 55×55; set by ``numerics="transformers"``).
        num_bands, max_resolution: Fourier features (``max_resolution`` default: the token grid).
        position_channels, project_pos_dim: trainable position width and its projection (-1: none).
        concat_or_add_pos: ``"concat"`` or ``"add"``.
        decoder_query_residual: query residual in the decoder (False for the learned-position model).
        num_decoder_heads, decoder_query_channels: decoder heads and query width (default d_latents).
        decoder_num_cross_attends: cross-attention layers of the decoder (official: 1; see
            :class:`~perceivers.io.BasicDecoder`'s ``num_cross_attends``).
        d_model: optional check of the preprocessed width (transformers' field; 261 / 322 / 512).
        chunk_size: stream large images through the encoder (``PerceiverIOModel.chunk_size``:
            ``None`` automatic, ``0`` off, ``n`` chunks of about ``n`` tokens).
        problem_type: loss used with ``labels`` (transformers' field): ``"regression"``,
            ``"single_label_classification"`` or ``"multi_label_classification"``; ``None`` picks one
            from ``num_labels`` and the label dtype.
        labels: class names in logit order (``config.id2label`` / ``label2id``); ``None``: the 1000
            ImageNet names (:func:`perceivers.data.imagenet_class_names`) when ``num_labels`` is 1000, else
            transformers' ``LABEL_i``.
    """

    num_latents: int = 512
    d_latents: int = 1024
    num_blocks: int = 8
    num_self_attends_per_block: int = 6
    num_cross_attention_heads: int = 1
    preprocessing: str = "pixels"
    position_encoding: str = "fourier"
    image_size: Any = (224, 224)
    in_channels: int = 3
    num_labels: int = 1000
    spatial_downsample: int = 1
    preprocessor_channels: int = 64
    conv_padding: str = "same"
    num_bands: int = 64
    max_resolution: Any = None
    position_channels: int = 256
    project_pos_dim: int = -1
    concat_or_add_pos: str = "concat"
    decoder_query_residual: bool = True
    num_decoder_heads: int = 1
    decoder_query_channels: int | None = None
    decoder_num_cross_attends: int = 1
    d_model: int | None = None
    chunk_size: int | None = None
    problem_type: str | None = None
    labels: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_problem_type(self.problem_type)
        self.labels = check_labels(self.labels, self.num_labels)
        self.image_size = as_pair(self.image_size, "image_size")
        self.max_resolution = as_tuple(self.max_resolution, "max_resolution")
        if self.preprocessing not in ("pixels", "conv", "conv1x1"):
            raise ValueError(f"preprocessing must be 'pixels', 'conv' or 'conv1x1', got {self.preprocessing!r}")
        check_conv_padding(self.conv_padding)
        check_count(spatial_downsample=self.spatial_downsample)
        if self.position_encoding not in ("fourier", "trainable"):
            raise ValueError(f"position_encoding must be 'fourier' or 'trainable', got {self.position_encoding!r}")

    def default_labels(self) -> tuple[str, ...] | None:
        """The ImageNet class names for 1000 classes (the official models)."""
        if self.num_labels != 1000:
            return None
        from ..data.image import imagenet_class_names

        return imagenet_class_names()

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(h, w)`` of the tokens for an ``image_size`` input."""
        s = self.spatial_downsample
        if self.preprocessing != "conv":
            return tuple(-(-n // s) for n in self.image_size)
        sizes = self.image_size
        for _ in range(round(math.log(s, 4))):  # one stem layer per 4×
            sizes = tuple(conv_stem_size(n, self.conv_padding) for n in sizes)
        return sizes


@model_output
@dataclass
class ImageClassifierOutput(TransformersIndexing):
    """``logits [B, num_labels]`` and the encoder latents ``last_hidden_state [B, N, D]``.

    With ``labels``: ``loss``; with ``output_hidden_states`` / ``output_attentions``: transformers'
    ``hidden_states``, ``attentions`` and ``cross_attentions`` (see :class:`~perceivers.io.PerceiverIOOutput`).
    """

    logits: Tensor
    last_hidden_state: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class ImageClassifier(SavesPretrained, nn.Module):
    """Perceiver IO image classifier: ``pixel_values [B, C, H, W]`` → :class:`ImageClassifierOutput`.

    Pixels are normalised with the ImageNet mean/std, NCHW (transformers' layout); they are moved
    to channels-last inside, so tokens follow the official row-major order.
    """

    def __init__(self, config: ImageClassificationConfig) -> None:
        super().__init__()
        self.config = c = config
        pos = build_position_encoding(
            c.position_encoding, num_dims=2, index_shape=c.token_grid, num_bands=c.num_bands,
            max_resolution=c.max_resolution or c.token_grid, num_channels=c.position_channels,
            project_pos_dim=c.project_pos_dim,
        )
        preprocessor = ImagePreprocessor(
            c.preprocessing, in_channels=c.in_channels, position_encoding=pos, spatial_downsample=c.spatial_downsample,
            num_channels=c.preprocessor_channels, concat_or_add_pos=c.concat_or_add_pos, conv_padding=c.conv_padding,
        )
        decoder = ClassificationDecoder(
            c.num_labels, latent_channels=c.d_latents, query_channels=c.decoder_query_channels,
            num_heads=c.num_decoder_heads, use_query_residual=c.decoder_query_residual, activation=c.hidden_act,
            num_cross_attends=c.decoder_num_cross_attends, dropout=c.dropout,
        )
        check_d_model(c.d_model, preprocessor.num_channels)
        self.perceiver = PerceiverIOModel(build_encoder(c, preprocessor.num_channels), decoder,
                                          input_preprocessor=preprocessor, chunk_size=c.chunk_size)
        set_attention_dropout(self, c.attention_probs_dropout_prob)

    def forward(
        self,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        inputs: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        head_mask: None = None,
        interpolate_pos_encoding: bool = False,
    ) -> ImageClassifierOutput | tuple:
        """Args:
            pixel_values: ``[B, C, H, W]`` normalised images (``inputs`` is transformers' name for it).
            attention_mask: ``[B, M]`` over the ``M`` image tokens, 1/True = attend (rarely useful).
            labels: ``[B]`` class ids, or ``[B, num_labels]`` (multi-label / regression); gives ``loss``
                (:func:`~perceivers.tasks.common.classification_loss`, ``config.problem_type``).
            output_hidden_states, output_attentions: also return the encoder latents per layer and the
                attention weights (see :class:`ImageClassifierOutput`).
            return_dict: ``False`` gives transformers' tuple (:func:`~perceivers.tasks.common.transformers_tuple`).
                These three default to the config's fields of the same names (``False``, ``False``, ``True``
                unless a transformers ``config.json`` said otherwise).
            head_mask, interpolate_pos_encoding: transformers' keywords; only their defaults are accepted.
        """
        pixel_values = one_input("pixel_values", pixel_values, "inputs", inputs)
        check_unsupported(head_mask, interpolate_pos_encoding)
        check_tensor(pixel_values, "pixel_values", kind="float", layout="[batch, channels, height, width]")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [batch, channels, height, width], got {tuple(pixel_values.shape)}")
        hidden, attentions, as_dict = output_flags(self.config, output_hidden_states, output_attentions, return_dict)
        out = self.perceiver(pixel_values, input_mask=attention_mask, output_hidden_states=hidden,
                             output_attentions=attentions)
        loss = None if labels is None else classification_loss(out.logits, labels, self.config.problem_type)
        if not as_dict:
            return transformers_tuple(loss, out.logits, out)
        return ImageClassifierOutput(out.logits, out.last_hidden_state, loss, out.hidden_states, out.attentions,
                                     out.cross_attentions)


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> ImageClassifier:
    return ImageClassifier(config_from_overrides(ImageClassificationConfig, defaults, overrides))


_TINY = {"num_latents": 8, "d_latents": 32, "num_blocks": 2, "num_self_attends_per_block": 2, "num_self_attention_heads": 2,
             "num_labels": 5, "num_bands": 4}

_NOTES = ("Eval pipeline: centre crop of side 224/256·min(H, W), bicubic resize to 224, ImageNet mean/std; "
          "arXiv 2107.14795 v3 Tab. 7 (config A, ImageNet only).")


@register_model(
    pretrained=PretrainedCfg(
        task="image-classification", haiku_checkpoint="imagenet_fourier_position_encoding.pystate",
        hf_hub_id="deepmind/vision-perceiver-fourier", input_size=(3, 224, 224), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, num_classes=1000, label_set="imagenet-1k", num_params=48_440_627,
        metrics={"imagenet_top1": 79.0}, notes=_NOTES,
    ),
    tiny=dict(_TINY, image_size=(12, 10), max_resolution=(12, 10)),
)
def vision_perceiver_fourier(**overrides: Any) -> ImageClassifier:
    """Raw pixels + 2-D Fourier features (64 bands, max resolution 224): 261 input channels."""
    return _build({"preprocessing": "pixels", "spatial_downsample": 1, "position_encoding": "fourier"}, overrides)


@register_model(
    pretrained=PretrainedCfg(
        task="image-classification", haiku_checkpoint="imagenet_conv_preprocessing.pystate",
        hf_hub_id="deepmind/vision-perceiver-conv", input_size=(3, 224, 224), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, num_classes=1000, label_set="imagenet-1k", num_params=48_646_522,
        metrics={"imagenet_top1": 82.1},
        notes=_NOTES + " The stem uses TF 'SAME' padding (56×56 tokens); transformers' port gives 55×55.",
    ),
    tiny=dict(_TINY, image_size=(16, 20), preprocessor_channels=8),
)
def vision_perceiver_conv(**overrides: Any) -> ImageClassifier:
    """Conv 7×7/2 + BatchNorm + ReLU + max-pool 3×3/2 (64 channels) + 2-D Fourier features: 322 channels."""
    return _build({"preprocessing": "conv", "spatial_downsample": 4, "position_encoding": "fourier"}, overrides)


@register_model(
    pretrained=PretrainedCfg(
        task="image-classification", haiku_checkpoint="imagenet_learned_position_encoding.pystate",
        hf_hub_id="deepmind/vision-perceiver-learned", input_size=(3, 224, 224), mean=IMAGENET_MEAN,
        std=IMAGENET_STD, num_classes=1000, label_set="imagenet-1k", num_params=62_255_848,
        metrics={"imagenet_top1": 72.7},
        notes=_NOTES + " Needs exactly 224×224 inputs; the decoder has no query residual (transformers: has one).",
    ),
    tiny=dict(_TINY, image_size=(6, 5), preprocessor_channels=8, position_channels=6, project_pos_dim=10),
)
def vision_perceiver_learned(**overrides: Any) -> ImageClassifier:
    """1×1 conv (256) + learned 1-D positions (256, projected to 256): 512 channels; 224×224 only."""
    return _build(
        {"preprocessing": "conv1x1", "spatial_downsample": 1, "position_encoding": "trainable", "preprocessor_channels": 256,
             "position_channels": 256, "project_pos_dim": 256, "decoder_query_residual": False},
        overrides,
    )
