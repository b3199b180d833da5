"""Token classification on UTF-8 bytes (tagging, NER): one label per input position.

The masked language model's architecture with its tied embedding decoder replaced by a ``Linear`` to
``num_labels``: byte embeddings plus learned positions, the trunk, and one trainable query per
position that cross-attends the latents. transformers has no such head (huggingface/transformers#14971
asked for one). Every tensor but the final ``Linear`` has the masked LM's name and shape, so
:func:`~perceivers.tasks.from_language_model` starts it from ``deepmind/language-perceiver`` with the
trunk *and* the per-position decoder pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..outputs import TransformersIndexing, model_output
from .common import (
    LabelNames,
    SavesPretrained,
    check_labels,
    check_unsupported,
    one_input,
    output_flags,
    transformers_tuple,
)
from .language import MaskedLanguageModelConfig, decode_positions, text_perceiver
from .pretrained import PretrainedCfg
from .registry import config_from_overrides, register_model

__all__ = ["TokenClassificationConfig", "TokenClassifier", "TokenClassifierOutput"]


@dataclass
class TokenClassificationConfig(LabelNames, MaskedLanguageModelConfig):
    """:class:`~perceivers.tasks.MaskedLanguageModelConfig` plus the label set.

    Attributes:
        num_labels: tags per position (e.g. 9 for CoNLL-2003's BIO tags).
        labels: tag names in logit order (``config.id2label`` / ``label2id``); ``None``: ``LABEL_i``.
    """

    num_labels: int = 2
    labels: Any = None

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        self.labels = check_labels(self.labels, self.num_labels)


@model_output
@dataclass
class TokenClassifierOutput(TransformersIndexing):
    """``logits [B, L, num_labels]``, the latents, and the loss when ``labels`` were given (plus, on request,
    ``hidden_states`` / ``attentions`` / ``cross_attentions`` as :class:`~perceivers.io.PerceiverIOOutput`)."""

    logits: Tensor
    last_hidden_state: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class TokenClassifier(SavesPretrained, nn.Module):
    """``inputs [B, L]`` byte ids (+ ``attention_mask``) → :class:`TokenClassifierOutput` (one label per byte).

    A word-level tag set is used by giving each word's tag to its first byte and ``-100`` (ignored) to
    the others, as is usual for sub-word tokenizers.
    """

    #: State-dict prefixes :func:`~perceivers.tasks.from_language_model` copies from a masked LM.
    transferred_prefixes = ("perceiver.input_preprocessor.", "perceiver.encoder.", "perceiver.decoder.queries.",
                            "perceiver.decoder.cross_attention.", "perceiver.decoder.extra_cross_attentions.",
                            "perceiver.decoder.self_attends.")

    def __init__(self, config: TokenClassificationConfig) -> None:
        super().__init__()
        self.config = config
        self.perceiver = text_perceiver(config, output_channels=config.num_labels)

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
    ) -> TokenClassifierOutput | tuple:
        """Args:
            inputs: ``[B, L]`` token ids, ``L <= max_position_embeddings`` (``input_ids`` is an alias).
            attention_mask: ``[B, L]``, 1/True = real token, 0/False = padding (encoder key mask and, with
                ``config.decoder_query_mask``, the decoder query mask).
            labels: ``[B, L]`` tag ids, -100 = ignored; gives ``loss`` (cross-entropy over the others).
            output_hidden_states, output_attentions, return_dict, head_mask: as the masked LM's.
        """
        check_unsupported(head_mask)
        ids = one_input("inputs", inputs, "input_ids", input_ids)
        hidden, attentions, as_dict = output_flags(self.config, output_hidden_states, output_attentions, return_dict)
        out = decode_positions(self.perceiver, self.config, ids, attention_mask, labels,
                               output_hidden_states=hidden, output_attentions=attentions)
        loss = None
        if labels is not None:
            if labels.numel() and int(labels.max()) >= self.config.num_labels:
                raise ValueError(f"labels must be < num_labels={self.config.num_labels} (or -100), "
                                 f"got {int(labels.max())}")
            loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1).long(),
                                   ignore_index=-100)
        if not as_dict:
            return transformers_tuple(loss, out.logits, out)
        return TokenClassifierOutput(out.logits, out.last_hidden_state, loss, out.hidden_states, out.attentions,
                                     out.cross_attentions)


@register_model(
    pretrained=PretrainedCfg(
        task="token-classification", input_size=(2048,), num_params=201_109_506,
        notes=("No official fine-tuned weights. Start from the masked LM with "
               "from_language_model('deepmind/language-perceiver', variant='language-perceiver-token-classifier', "
               "num_labels=...): trunk and per-position decoder pretrained, the output Linear new."),
    ),
    tiny={"vocab_size": 262, "max_position_embeddings": 16, "d_model": 16, "d_latents": 24, "num_latents": 6,
          "num_self_attends_per_block": 2, "num_self_attention_heads": 2, "num_cross_attention_heads": 2,
          "qk_channels": 8, "v_channels": 24, "num_decoder_heads": 2, "num_labels": 5},
)
def language_perceiver_token_classifier(**overrides: Any) -> TokenClassifier:
    """The language Perceiver (256 × 1280 latents, 26 layers, 2048 byte queries) with a per-position tag ``Linear``."""
    return TokenClassifier(config_from_overrides(TokenClassificationConfig, {}, overrides))
