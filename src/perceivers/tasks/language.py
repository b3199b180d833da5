"""Masked language modelling on UTF-8 bytes (the official 201M-parameter Perceiver IO)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..io import BasicDecoder, PerceiverIOModel, TrainableQueries
from ..io.processors import EmbeddingDecoder, TextPreprocessor
from ..outputs import TransformersIndexing, model_output
from ..validation import as_bool_mask, check_tensor
from .common import (
    SavesPretrained,
    TrunkConfig,
    build_encoder,
    check_unsupported,
    one_input,
    output_flags,
    set_attention_dropout,
    transformers_tuple,
)
from .pretrained import PretrainedCfg
from .registry import config_from_overrides, register_model

__all__ = ["MaskedLMOutput", "MaskedLanguageModel", "MaskedLanguageModelConfig", "decode_positions",
           "text_perceiver"]


@dataclass
class MaskedLanguageModelConfig(TrunkConfig):
    """Byte-level masked LM: embeddings + learned positions, trunk, per-position queries, tied output.

    Attributes:
        vocab_size: 262 (256 bytes + 6 special ids).
        max_position_embeddings: maximum sequence length (positions and decoder queries).
        d_model: width of the embeddings and of the decoder queries.
        num_decoder_heads: decoder cross-attention heads.
        decoder_qk_channels: decoder q/k width (default ``qk_channels``).
        decoder_v_channels: decoder v width (default ``d_model``).
        decoder_query_residual: query residual in the decoder (False officially).
        decoder_query_mask: padded positions (``attention_mask`` 0) decode from zero attention, as
            DeepMind's model; ``False`` decodes them like real positions, as transformers does.
        decoder_num_cross_attends, decoder_num_self_attends_per_cross: a deeper decoder
            (:class:`~perceivers.io.BasicDecoder`'s ``num_cross_attends`` / ``num_self_attends_per_cross``;
            official: 1 and 0). With ``decoder_query_mask`` padded positions are hidden from the query
            self-attention; sequences shorter than ``max_position_embeddings`` decode as if padded and masked.
    """

    qk_channels: int | None = 256
    v_channels: int | None = 1280
    vocab_size: int = 262
    max_position_embeddings: int = 2048
    d_model: int = 768
    num_decoder_heads: int = 8
    decoder_qk_channels: int | None = None
    decoder_v_channels: int | None = None
    decoder_query_residual: bool = False
    decoder_query_mask: bool = True
    decoder_num_cross_attends: int = 1
    decoder_num_self_attends_per_cross: int = 0


@model_output
@dataclass
class MaskedLMOutput(TransformersIndexing):
    """``logits [B, L, vocab_size]``, the latents, and the loss when ``labels`` were given.

    With ``output_hidden_states`` / ``output_attentions``: transformers' ``hidden_states``, ``attentions`` and
    ``cross_attentions`` (see :class:`~perceivers.io.PerceiverIOOutput`).
    """

    logits: Tensor
    last_hidden_state: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


def text_perceiver(c: MaskedLanguageModelConfig, output_channels: int | None = None) -> PerceiverIOModel:
    """Byte embeddings + positions → trunk → one trainable query per position (``d_model`` wide) that
    cross-attends the latents, then a ``Linear`` to ``output_channels`` (``None``: none, the masked LM's
    tied embedding decoder follows instead)."""
    preprocessor = TextPreprocessor(c.vocab_size, c.d_model, c.max_position_embeddings)
    decoder = BasicDecoder(
        TrainableQueries(c.max_position_embeddings, c.d_model), latent_channels=c.d_latents,
        output_channels=output_channels, num_heads=c.num_decoder_heads,
        qk_channels=c.qk_channels if c.decoder_qk_channels is None else c.decoder_qk_channels,
        v_channels=c.d_model if c.decoder_v_channels is None else c.decoder_v_channels,
        use_query_residual=c.decoder_query_residual, dropout=c.dropout, activation=c.hidden_act,
        num_cross_attends=c.decoder_num_cross_attends, num_self_attends_per_cross=c.decoder_num_self_attends_per_cross,
    )
    perceiver = PerceiverIOModel(build_encoder(c, preprocessor.num_channels), decoder, input_preprocessor=preprocessor)
    set_attention_dropout(perceiver, c.attention_probs_dropout_prob)
    return perceiver


def decode_positions(
    perceiver: PerceiverIOModel,
    config: MaskedLanguageModelConfig,
    ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor | None,
    *,
    output_hidden_states: bool | None = None,
    output_attentions: bool | None = None,
):
    """Check ``ids [B, L]``, ``attention_mask`` and per-position ``labels [B, L]``, then run a
    :func:`text_perceiver` with one query per position (padded queries masked as ``config`` says)."""
    check_tensor(ids, "inputs", kind="int", ndim=2, layout="[batch, length] token ids")
    if labels is not None:
        check_tensor(labels, "labels", kind="int", ndim=2, layout="[batch, length] target ids (-100 = ignored)")
        if labels.shape != ids.shape:
            raise ValueError(f"labels must have the shape of inputs {tuple(ids.shape)}, got {tuple(labels.shape)}")
    attention_mask = as_bool_mask(attention_mask, "attention_mask")  # checked under the caller's name
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask must have shape {tuple(ids.shape)}, got {tuple(attention_mask.shape)}")
    query_mask = attention_mask if config.decoder_query_mask else None
    return perceiver(ids, input_mask=attention_mask, query_mask=query_mask, query_kwargs={"length": ids.shape[1]},
                     output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions))


class MaskedLanguageModel(SavesPretrained, nn.Module):
    """``inputs [B, L]`` byte ids (+ ``attention_mask``) → :class:`MaskedLMOutput`.

    Sequences may be shorter than ``max_position_embeddings``: the first ``L`` positions and
    decoder queries are used, which equals padding to full length with masked positions.
    """

    def __init__(self, config: MaskedLanguageModelConfig) -> None:
        super().__init__()
        self.config = config
        self.perceiver = text_perceiver(config)
        self.embedding_decoder = EmbeddingDecoder(config.vocab_size)

    def forward(
        self,
        inputs: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        input_ids: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        head_mask: None = None,
    ) -> MaskedLMOutput | tuple:
        """Args:
            inputs: ``[B, L]`` token ids (``input_ids`` is an alias).
            attention_mask: ``[B, L]``, 1/True = real token, 0/False = padding; used as the encoder
                key mask and, with ``config.decoder_query_mask``, as the decoder query mask (padded rows
                decode from zero attention).
            labels: ``[B, L]`` target ids, -100 = ignored; gives ``loss`` (cross-entropy).
            output_hidden_states, output_attentions: also return the encoder latents per layer and the
                attention weights (see :class:`MaskedLMOutput`).
            return_dict: ``False`` gives transformers' tuple (:func:`~perceivers.tasks.common.transformers_tuple`).
                These three default to the config's fields of the same names.
            head_mask: transformers' keyword; only ``None`` is accepted.
        """
        check_unsupported(head_mask)
        ids = one_input("inputs", inputs, "input_ids", input_ids)
        hidden, attentions, as_dict = output_flags(self.config, output_hidden_states, output_attentions, return_dict)
        out = decode_positions(self.perceiver, self.config, ids, attention_mask, labels,
                               output_hidden_states=hidden, output_attentions=attentions)
        table = self.perceiver.input_preprocessor.embeddings.weight  # tied input/output embedding
        logits = self.embedding_decoder(out.logits, table)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)
        if not as_dict:
            return transformers_tuple(loss, logits, out)
        return MaskedLMOutput(logits, out.last_hidden_state, loss, out.hidden_states, out.attentions,
                              out.cross_attentions)


@register_model(
    pretrained=PretrainedCfg(
        task="masked-lm", haiku_checkpoint="language_perceiver_io_bytes.pickle",
        hf_hub_id="deepmind/language-perceiver", input_size=(2048,), num_params=201_108_230,
        metrics={"glue_dev_avg": 80.95},
        notes=("UTF-8 bytes + 6 (PAD 0, BOS 1, EOS 2, MASK 3, CLS 4, SEP 5), right-padded; the official colab "
               "adds no CLS/SEP (transformers' tokenizer does). GLUE needs fine-tuning; arXiv 2107.14795 v3 Tab. 14."),
    ),
    tiny={"vocab_size": 262, "max_position_embeddings": 16, "d_model": 16, "d_latents": 24, "num_latents": 6,
              "num_self_attends_per_block": 2, "num_self_attention_heads": 2, "num_cross_attention_heads": 2, "qk_channels": 8,
              "v_channels": 24, "num_decoder_heads": 2},
)
def language_perceiver(**overrides: Any) -> MaskedLanguageModel:
    """256 × 1280 latents, 26 self-attention layers, d_model 768, 2048 bytes."""
    return MaskedLanguageModel(config_from_overrides(MaskedLanguageModelConfig, {}, overrides))
