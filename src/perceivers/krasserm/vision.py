"""krasserm's ``perceiver.model.vision.image_classifier`` (perceiver-io 0.11) on :mod:`perceivers.krasserm.core`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from perceivers.configurable import configurable
from perceivers.krasserm.core import (
    ClassificationDecoderConfig,
    EncoderConfig,
    FourierPositionEncoding,
    InputAdapter,
    PerceiverEncoder,
    PerceiverIO,
    PerceiverIOConfig,
    _rename_keys,
    classification_decoder,
)

__all__ = ["ImageClassifier", "ImageClassifierConfig", "ImageEncoder", "ImageEncoderConfig", "ImageInputAdapter"]


@dataclass
class ImageEncoderConfig(EncoderConfig):
    image_shape: tuple[int, int, int] = (224, 224, 3)
    num_frequency_bands: int = 32


ImageClassifierConfig = PerceiverIOConfig[ImageEncoderConfig, ClassificationDecoderConfig]
ImageEncoder = PerceiverEncoder  # krasserm's backwards-compatible alias


class ImageInputAdapter(InputAdapter):
    """Channels-last images ``[B, *image_shape]`` (e.g. ``[B, H, W, C]``) → pixels followed by Fourier
    position features ``[B, H·W, C + 2·(2K+1)]``. The image shape must equal ``image_shape`` exactly."""

    def __init__(self, image_shape: tuple[int, ...], num_frequency_bands: int) -> None:
        *spatial_shape, num_image_channels = image_shape
        position_encoding = FourierPositionEncoding(spatial_shape, num_frequency_bands)
        super().__init__(num_input_channels=num_image_channels + position_encoding.num_position_encoding_channels())
        self.image_shape = tuple(image_shape)
        self.position_encoding = position_encoding
        # perceiver-io 0.6 held the Fourier features as this adapter's own buffer
        self.register_load_state_dict_pre_hook(_rename_keys({"position_encoding": "position_encoding.position_encoding"}))

    def forward(self, x: Tensor) -> Tensor:
        b, *d = x.shape
        if tuple(d) != self.image_shape:
            raise ValueError(f"Input vision shape {tuple(d)} different from required shape {self.image_shape}")
        x_enc = self.position_encoding(b)
        x = rearrange(x, "b ... c -> b (...) c")
        return torch.cat([x, x_enc], dim=-1)


@configurable
class ImageClassifier(PerceiverIO):
    """Perceiver IO image classifier: ``forward(x [B, H, W, C])`` → logits ``[B, num_classes]``.

    The encoder's cross-attention query/key width defaults to the adapter's input width (pixels plus
    position features), as krasserm's does.
    """

    def __init__(self, config: ImageClassifierConfig) -> None:
        input_adapter = ImageInputAdapter(config.encoder.image_shape, config.encoder.num_frequency_bands)
        encoder_kwargs = config.encoder.base_kwargs()
        if encoder_kwargs["num_cross_attention_qk_channels"] is None:
            encoder_kwargs["num_cross_attention_qk_channels"] = input_adapter.num_input_channels
        encoder = PerceiverEncoder(
            input_adapter=input_adapter, num_latents=config.num_latents,
            num_latent_channels=config.num_latent_channels, activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading, **encoder_kwargs,
        )
        if config.decoder.num_output_queries != 1:
            warnings.warn(f"ImageClassifier uses one output query, as krasserm's 0.11 does (0.6 used "
                          f"num_output_queries); num_output_queries={config.decoder.num_output_queries} is ignored",
                          stacklevel=2)
        super().__init__(encoder, classification_decoder(config, 1))
        self.config = config

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return self.decoder(self.encoder(x, pad_mask=pad_mask))
