"""Optical flow (the official AutoFlow-trained Perceiver IO): one query per pixel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..io import FlowDecoder, PerceiverIOModel
from ..io.processors import FlowPreprocessor
from ..outputs import TransformersIndexing, model_output
from ..validation import check_tensor
from .common import (
    SavesPretrained,
    TrunkConfig,
    as_pair,
    as_tuple,
    build_encoder,
    check_d_model,
    check_unsupported,
    output_flags,
    set_attention_dropout,
    transformers_tuple,
)
from .pretrained import PretrainedCfg
from .registry import config_from_overrides, register_model

__all__ = ["OpticalFlowConfig", "OpticalFlowModel", "OpticalFlowOutput"]


@dataclass
class OpticalFlowConfig(TrunkConfig):
    """Flow between two frames of size ``train_size``.

    Attributes:
        train_size: ``(H, W)`` the model decodes (368×496 officially; larger images need tiling).
        num_bands, max_resolution: 2-D Fourier features (``max_resolution`` default ``train_size``).
        preprocessor_channels: width of the ``Linear`` applied to the 54 patch values.
        num_decoder_heads, decoder_query_residual: the decoder cross-attention.
        rescale_factor: the decoder divides its output by this (100).
        flow_scale_factor: ``flow = logits × flow_scale_factor`` gives pixels (20, the colab's
            ``FLOW_SCALE_FACTOR``).
    """

    num_latents: int = 2048
    d_latents: int = 512
    num_self_attends_per_block: int = 24
    num_self_attention_heads: int = 16
    num_cross_attention_heads: int = 1
    train_size: Any = (368, 496)
    num_bands: int = 64
    max_resolution: Any = None
    preprocessor_channels: int = 64
    num_decoder_heads: int = 1
    decoder_query_residual: bool = False
    rescale_factor: float = 100.0
    flow_scale_factor: float = 20.0
    d_model: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.train_size = as_pair(self.train_size, "train_size")
        self.max_resolution = as_tuple(self.max_resolution, "max_resolution")


@model_output
@dataclass
class OpticalFlowOutput(TransformersIndexing):
    """Attributes:
        flow: ``[B, H, W, 2]`` flow in pixels (``(dx, dy)`` order as the official model), = logits × 20.
        logits: ``[B, H, W, 2]`` the decoder output / 100 — what transformers' ``PerceiverForOpticalFlow``
            returns.
        last_hidden_state: the latents.
        loss: always ``None`` (transformers' field; training from flow labels is not supported).
        hidden_states, attentions, cross_attentions: with ``output_hidden_states`` / ``output_attentions``
            (see :class:`~perceivers.io.PerceiverIOOutput`).
    """

    flow: Tensor
    logits: Tensor
    last_hidden_state: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class OpticalFlowModel(SavesPretrained, nn.Module):
    """Two frames → per-pixel flow.

    Inputs: transformers' 3×3 patches ``[B, 2, 27, H, W]`` or frame pairs ``[B, 2, 3, H, W]``
    normalised to [−1, 1] (``x / 255 · 2 − 1``); ``(H, W) = train_size``.
    """

    def __init__(self, config: OpticalFlowConfig) -> None:
        super().__init__()
        self.config = c = config
        preprocessor = FlowPreprocessor(image_size=c.train_size, num_bands=c.num_bands,
                                        max_resolution=c.max_resolution, num_channels=c.preprocessor_channels)
        decoder = FlowDecoder(
            query_channels=preprocessor.num_channels, latent_channels=c.d_latents, output_image_shape=c.train_size,
            rescale_factor=c.rescale_factor, num_heads=c.num_decoder_heads, use_query_residual=c.decoder_query_residual,
            activation=c.hidden_act, cross_attention_shape_for_attn=c.cross_attention_shape_for_attention,
            dropout=c.dropout,
        )
        check_d_model(c.d_model, preprocessor.num_channels)
        self.perceiver = PerceiverIOModel(build_encoder(c, preprocessor.num_channels), decoder,
                                          input_preprocessor=preprocessor)
        set_attention_dropout(self, c.attention_probs_dropout_prob)

    def forward(
        self,
        inputs: Tensor,
        attention_mask: Tensor | None = None,
        labels: None = None,
        *,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        head_mask: None = None,
    ) -> OpticalFlowOutput | tuple:
        """``[B, 2, 27 | 3, H, W]`` → :class:`OpticalFlowOutput`.

        Args:
            attention_mask: ``[B, H·W]`` over the pixel tokens, 1/True = attend (encoder key mask).
            labels: refused with ``NotImplementedError``, as transformers does (compute a loss from
                ``.flow`` or ``.logits`` yourself).
            output_hidden_states, output_attentions, return_dict, head_mask: as the image classifier's.
        """
        if labels is not None:
            raise NotImplementedError("optical flow has no built-in loss (transformers: 'not yet supported'); "
                                      "compare .flow (pixels) or .logits (flow / 20) with your targets")
        check_unsupported(head_mask)
        check_tensor(inputs, "inputs", kind="float", layout="[batch, 2, 27 or 3, H, W]")
        if inputs.ndim != 5 or tuple(inputs.shape[-2:]) != self.config.train_size:
            raise ValueError(
                f"inputs must be [batch, 2, 27 or 3, {self.config.train_size[0]}, {self.config.train_size[1]}], got "
                f"{tuple(inputs.shape)}; tile larger images"
            )
        hidden, attentions, as_dict = output_flags(self.config, output_hidden_states, output_attentions, return_dict)
        out = self.perceiver(inputs, input_mask=attention_mask, output_hidden_states=hidden,
                             output_attentions=attentions)
        if not as_dict:
            return transformers_tuple(None, out.logits, out)
        return OpticalFlowOutput(out.logits * self.config.flow_scale_factor, out.logits, out.last_hidden_state, None,
                                 out.hidden_states, out.attentions, out.cross_attentions)


@register_model(
    pretrained=PretrainedCfg(
        task="optical-flow", haiku_checkpoint="optical_flow_checkpoint.pystate",
        hf_hub_id="deepmind/optical-flow-perceiver", input_size=(2, 3, 368, 496), num_params=41_057_134,
        metrics={"sintel_clean_epe": 1.81, "sintel_final_epe": 2.42, "kitti_2015_epe": 4.98},
        notes=("Frames normalised x/255*2-1; larger images: tiles of 368x496 with overlap >= 20 weighted by the "
               "distance to the tile border (arXiv 2107.14795 v3 Tab. 3, App. H; AutoFlow protocol)."),
    ),
    tiny={"train_size": (6, 8), "num_bands": 3, "num_latents": 8, "d_latents": 32, "num_self_attends_per_block": 2,
              "num_self_attention_heads": 4, "preprocessor_channels": 8},
)
def optical_flow_perceiver(**overrides: Any) -> OpticalFlowModel:
    """2048 × 512 latents, 24 self-attention layers (16 heads), 322-channel pixel queries."""
    return OpticalFlowModel(config_from_overrides(OpticalFlowConfig, {}, overrides))
