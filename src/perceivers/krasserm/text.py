"""krasserm's text backends (perceiver-io 0.11): ``perceiver.model.text.common``, ``.mlm`` and ``.classifier``.

Same configs, keys and outputs; built from :mod:`perceivers.krasserm.core`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from perceivers.configurable import configurable
from perceivers.krasserm.core import (
    ClassificationDecoderConfig,
    DecoderConfig,
    EncoderConfig,
    OutputAdapter,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    PerceiverIOConfig,
    TiedTokenOutputAdapter,
    TokenInputAdapter,
    TrainableQueryProvider,
    classification_decoder,
    freeze,
)
from perceivers.layers.dense import Linear

__all__ = [
    "MaskedLanguageModel", "MaskedLanguageModelConfig", "TextClassifier", "TextClassifierConfig", "TextDecoder",
    "TextDecoderConfig", "TextEncoder", "TextEncoderConfig", "TokenOutputAdapter",
]


@dataclass
class TextEncoderConfig(EncoderConfig):
    vocab_size: int = 10003
    max_seq_len: int = 256
    num_input_channels: int = 64
    params: str | None = None


class TextEncoder(PerceiverEncoder):
    """:class:`PerceiverEncoder` over a :class:`TokenInputAdapter` (token ids ``[B, N]``)."""

    def __init__(self, config: TextEncoderConfig, num_latents: int, num_latent_channels: int,
                 activation_checkpointing: bool, activation_offloading: bool) -> None:
        input_adapter = TokenInputAdapter(
            vocab_size=config.vocab_size, max_seq_len=config.max_seq_len,
            num_input_channels=config.num_input_channels,
        )
        super().__init__(
            input_adapter=input_adapter, num_latents=num_latents, num_latent_channels=num_latent_channels,
            activation_checkpointing=activation_checkpointing, activation_offloading=activation_offloading,
            **config.base_kwargs(),
        )
        if config.freeze:
            freeze(self)


@dataclass
class TextDecoderConfig(DecoderConfig):
    num_output_query_channels: int | None = None
    vocab_size: int = 10003
    max_seq_len: int = 512


MaskedLanguageModelConfig = PerceiverIOConfig[TextEncoderConfig, TextDecoderConfig]
TextClassifierConfig = PerceiverIOConfig[TextEncoderConfig, ClassificationDecoderConfig]
TextDecoder = PerceiverDecoder  # krasserm's backwards-compatible alias


class TokenOutputAdapter(OutputAdapter):
    """Untied logits: ``linear`` ``[B, N, F]`` → ``[B, N, vocab_size]``."""

    def __init__(self, vocab_size: int, num_output_query_channels: int) -> None:
        super().__init__()
        self.linear = Linear(num_output_query_channels, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(dim=1)


@configurable
class MaskedLanguageModel(PerceiverIO):
    """Perceiver IO masked language model: ``forward(x_masked [B, N], pad_mask=None)`` → logits ``[B, N, V]``.

    With ``decoder.num_output_query_channels=None`` the output queries have the encoder's input width
    and the logits are tied to the token embedding (plus a bias); otherwise a linear layer.
    """

    def __init__(self, config: MaskedLanguageModelConfig) -> None:
        encoder = TextEncoder(
            config.encoder, num_latents=config.num_latents, num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
        )
        dec = config.decoder
        if dec.num_output_query_channels is None:
            query = TrainableQueryProvider(dec.max_seq_len, config.encoder.num_input_channels, dec.init_scale)
            output_adapter = TiedTokenOutputAdapter(vocab_size=dec.vocab_size)
        else:
            query = TrainableQueryProvider(dec.max_seq_len, dec.num_output_query_channels, dec.init_scale)
            output_adapter = TokenOutputAdapter(dec.vocab_size, dec.num_output_query_channels)
        decoder = PerceiverDecoder(
            output_adapter=output_adapter, output_query_provider=query, num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading, **dec.base_kwargs(),
        )
        super().__init__(encoder, decoder)
        self.config = config

    def forward(self, x_masked: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        n = x_masked.shape[1]
        x_latent = self.encoder(x_masked, pad_mask)
        kwargs = {}
        if isinstance(self.decoder.output_adapter, TiedTokenOutputAdapter):
            kwargs["txt_embedding"] = self.encoder.input_adapter.txt_embedding
        # the logits of the first n of max_seq_len output queries: only those are decoded (a query attends the latents
        # alone), unless dropout in training draws over all of them (krasserm's random stream). A slice of all the
        # logits is a view whose layout depends on n, which made torch.export fix the length.
        decoded = None if self.training and self.config.decoder.dropout > 0 else n
        return self.decoder(x_latent, num_queries=decoded, **kwargs)[:, :n, :]


@configurable
class TextClassifier(PerceiverIO):
    """Perceiver IO text classifier: ``forward(x [B, N], pad_mask=None)`` → logits ``[B, num_classes]``."""

    def __init__(self, config: TextClassifierConfig) -> None:
        encoder = TextEncoder(
            config.encoder, num_latents=config.num_latents, num_latent_channels=config.num_latent_channels,
            activation_checkpointing=config.activation_checkpointing,
            activation_offloading=config.activation_offloading,
        )
        super().__init__(encoder, classification_decoder(config, config.decoder.num_output_queries))
        self.config = config

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return self.decoder(self.encoder(x, pad_mask=pad_mask))
