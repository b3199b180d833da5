"""Sequence classification on UTF-8 bytes: the language Perceiver's trunk with a one-query classifier.

The architecture of transformers' ``PerceiverForSequenceClassification``: byte embeddings plus
learned positions, the encoder of ``language-perceiver``, and a decoder whose single trainable
query (``d_latents`` wide) cross-attends the latents and is projected to ``num_labels``. DeepMind
released no fine-tuned weights; the documented starting point is the masked-LM checkpoint, whose
trunk :func:`from_language_model` copies (the MLM decoder is left out and named).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..io import ClassificationDecoder, PerceiverIOModel
from ..io.processors import TextPreprocessor
from ..outputs import TransformersIndexing, model_output
from ..validation import as_bool_mask, check_tensor
from .common import (
    LabelNames,
    SavesPretrained,
    TrunkConfig,
    build_encoder,
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
from .registry import config_from_overrides, create_model, register_model

__all__ = [
    "SequenceClassificationConfig",
    "SequenceClassifier",
    "SequenceClassifierOutput",
    "TrunkTransfer",
    "from_language_model",
]

logger = logging.getLogger(__name__)

#: State-dict prefixes of the text trunk (shared by the masked LM and the classifier).
TRUNK_PREFIXES = ("perceiver.input_preprocessor.", "perceiver.encoder.")


@dataclass
class SequenceClassificationConfig(LabelNames, TrunkConfig):
    """Byte-level sequence classifier: embeddings + learned positions, trunk, one classification query.

    Attributes:
        vocab_size: 262 (256 bytes + 6 special ids).
        max_position_embeddings: maximum sequence length.
        d_model: width of the byte embeddings and positions.
        num_labels: classifier outputs (1 = regression).
        num_decoder_heads: heads of the decoder cross-attention (transformers: 1).
        decoder_query_residual: query residual in the decoder (transformers: True).
        decoder_num_cross_attends: cross-attention layers of the decoder (official: 1; see
            :class:`~perceivers.io.BasicDecoder`'s ``num_cross_attends``).
        problem_type: loss used with ``labels``: ``"regression"`` (MSE), ``"single_label_classification"``
            (cross-entropy) or ``"multi_label_classification"`` (BCE with logits); ``None`` picks one
            from ``num_labels`` and the label dtype, as transformers does.
        labels: class names in logit order (``config.id2label`` / ``label2id``); ``None``: ``LABEL_i``.
    """

    qk_channels: int | None = 256
    v_channels: int | None = 1280
    vocab_size: int = 262
    max_position_embeddings: int = 2048
    d_model: int = 768
    num_labels: int = 2
    num_decoder_heads: int = 1
    decoder_query_residual: bool = True
    decoder_num_cross_attends: int = 1
    problem_type: str | None = None
    labels: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        check_problem_type(self.problem_type)
        self.labels = check_labels(self.labels, self.num_labels)


@model_output
@dataclass
class SequenceClassifierOutput(TransformersIndexing):
    """``logits [B, num_labels]``, the latents ``last_hidden_state [B, N, D]``, and the loss when ``labels`` were given.

    With ``output_hidden_states`` / ``output_attentions``: transformers' ``hidden_states``, ``attentions`` and
    ``cross_attentions`` (see :class:`~perceivers.io.PerceiverIOOutput`).
    """

    logits: Tensor
    last_hidden_state: Tensor
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class SequenceClassifier(SavesPretrained, nn.Module):
    """``inputs [B, L]`` byte ids (+ ``attention_mask``) → :class:`SequenceClassifierOutput`.

    Tensor names of the trunk equal :class:`~perceivers.tasks.MaskedLanguageModel`'s, so a masked-LM
    state dict initialises it (:func:`from_language_model`).
    """

    #: State-dict prefixes :func:`from_language_model` copies from a masked LM.
    transferred_prefixes = TRUNK_PREFIXES

    def __init__(self, config: SequenceClassificationConfig) -> None:
        super().__init__()
        self.config = c = config
        preprocessor = TextPreprocessor(c.vocab_size, c.d_model, c.max_position_embeddings)
        decoder = ClassificationDecoder(
            c.num_labels, latent_channels=c.d_latents, num_heads=c.num_decoder_heads,
            use_query_residual=c.decoder_query_residual, dropout=c.dropout, activation=c.hidden_act,
            num_cross_attends=c.decoder_num_cross_attends,
        )
        self.perceiver = PerceiverIOModel(build_encoder(c, preprocessor.num_channels), decoder,
                                          input_preprocessor=preprocessor)
        set_attention_dropout(self, c.attention_probs_dropout_prob)

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
    ) -> SequenceClassifierOutput | tuple:
        """Args:
            inputs: ``[B, L]`` token ids, ``L <= max_position_embeddings`` (``input_ids`` is an alias).
            attention_mask: ``[B, L]``, 1/True = real token, 0/False = padding (encoder key mask).
            labels: ``[B]`` class ids (single-label), ``[B, num_labels]`` floats (multi-label, or
                regression targets), or ``[B]`` floats (regression with one label); gives ``loss``.
            output_hidden_states, output_attentions: also return the encoder latents per layer and the
                attention weights (see :class:`SequenceClassifierOutput`).
            return_dict: ``False`` gives transformers' tuple (:func:`~perceivers.tasks.common.transformers_tuple`).
                These three default to the config's fields of the same names.
            head_mask: transformers' keyword; only ``None`` is accepted.
        """
        ids = one_input("inputs", inputs, "input_ids", input_ids)
        check_unsupported(head_mask)
        check_tensor(ids, "inputs", kind="int", ndim=2, layout="[batch, length] token ids")
        attention_mask = as_bool_mask(attention_mask, "attention_mask")  # checked under the caller's name
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask must have shape {tuple(ids.shape)}, got {tuple(attention_mask.shape)}")
        hidden, attentions, as_dict = output_flags(self.config, output_hidden_states, output_attentions, return_dict)
        out = self.perceiver(ids, input_mask=attention_mask, output_hidden_states=hidden, output_attentions=attentions)
        loss = None if labels is None else self.loss(out.logits, labels)
        if not as_dict:
            return transformers_tuple(loss, out.logits, out)
        return SequenceClassifierOutput(out.logits, out.last_hidden_state, loss, out.hidden_states, out.attentions,
                                        out.cross_attentions)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``config.problem_type`` (or the one implied by ``num_labels`` and the label dtype)."""
        return classification_loss(logits, labels, self.config.problem_type)


@dataclass(frozen=True)
class TrunkTransfer:
    """What :func:`from_language_model` copied.

    Attributes:
        loaded: classifier tensors taken from the source (embeddings, positions, encoder).
        skipped: source tensors left out (the masked-LM decoder and output bias).
        initialised: classifier tensors left at their fresh initialisation (the classification decoder).
    """

    loaded: tuple[str, ...]
    skipped: tuple[str, ...]
    initialised: tuple[str, ...]


#: Decoder fields a token classifier takes from the masked LM along with its decoder's weights.
_DECODER_FIELDS = ("num_decoder_heads", "decoder_qk_channels", "decoder_v_channels", "decoder_query_residual",
                   "decoder_num_cross_attends", "decoder_num_self_attends_per_cross")

#: Trunk fields that size nothing (dropout, the forward's defaults): overrides may differ from the source's.
_NOT_SIZES = ("dropout", "attention_probs_dropout_prob", "output_attentions", "output_hidden_states", "return_dict")


def _trunk_fields(config: Any, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrunkConfig)} | {"vocab_size", "max_position_embeddings", "d_model",
                                                                  *extra}
    missing = sorted(n for n in names if not hasattr(config, n))
    if missing:
        raise TypeError(f"source config {type(config).__name__} lacks the text-trunk fields {missing}")
    return {n: getattr(config, n) for n in names}


def from_language_model(
    source: nn.Module | str | os.PathLike[str],
    *,
    num_labels: int | None = None,
    variant: str = "language-perceiver-classifier",
    load_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """A ``language-perceiver-classifier`` (or ``-token-classifier``) whose trunk is copied from a masked LM.

    The fine-tuning starting point transformers documents (``PerceiverForSequenceClassification
    .from_pretrained("deepmind/language-perceiver")``): embeddings, positions and encoder come from
    the masked LM; its decoder (2048 queries, cross-attention) and output bias are left out; the
    classification decoder keeps its random initialisation. A token classifier keeps the decoder too
    (with the masked LM's decoder sizes). The transfer is logged (INFO) and kept
    as ``model.trunk_transfer`` (:class:`TrunkTransfer`).

    Args:
        source: a ``language-perceiver`` model (or any model with the same trunk), or a path / Hub
            id that :func:`perceivers.from_pretrained` loads (our format, or a transformers
            ``PerceiverForMaskedLM`` checkpoint).
        num_labels: classifier outputs (default: the number of ``labels`` names if given, else 2).
        variant: ``"language-perceiver-classifier"`` (one label per sequence) or
            ``"language-perceiver-token-classifier"`` (one per position, which also takes the masked LM's
            per-position queries and decoder cross-attention; only its output ``Linear`` is new). The
            model class's ``transferred_prefixes`` say what is copied.
        load_options: keyword arguments for :func:`perceivers.from_pretrained` (e.g.
            ``{"numerics": "transformers"}``).
        **overrides: other config fields of ``variant`` (decoder options, dropout, ``problem_type``,
            ``labels``, the forward's defaults ``output_attentions`` …); trunk sizes (and a token
            classifier's decoder sizes) come from the source.

    Raises:
        ValueError: the source has no text trunk, or an override changes a trunk size.
    """
    if not isinstance(source, nn.Module):
        from ..hub import from_pretrained

        source = from_pretrained(source, **dict(load_options or {}))
    elif load_options:
        raise TypeError("load_options only apply when source is a path or Hub id")
    if variant not in ("language-perceiver-classifier", "language-perceiver-token-classifier"):
        raise ValueError(f"variant must be 'language-perceiver-classifier' or 'language-perceiver-token-classifier', "
                         f"got {variant!r}")
    token = variant == "language-perceiver-token-classifier"
    trunk = _trunk_fields(getattr(source, "config", None), _DECODER_FIELDS if token else ())
    clash = {k: (v, trunk[k]) for k, v in overrides.items() if k in trunk and v != trunk[k] and k not in _NOT_SIZES}
    if clash:
        raise ValueError("trunk sizes come from the language model; overrides differ: "
                         + ", ".join(f"{k}={v[0]!r} (source has {v[1]!r})" for k, v in clash.items()))
    if num_labels is None:
        names = overrides.get("labels")
        num_labels = 2 if names is None else len(names)
    model = create_model(variant, **{**trunk, **overrides, "num_labels": num_labels})
    prefixes = type(model).transferred_prefixes
    source_state = source.state_dict()
    target = model.state_dict()
    loaded, initialised = [], []
    for key, value in target.items():
        if not key.startswith(prefixes):
            initialised.append(key)
            continue
        if key not in source_state:
            raise ValueError(f"the source model has no tensor {key!r}; it is not a language Perceiver")
        if source_state[key].shape != value.shape:
            raise ValueError(f"{key}: source shape {tuple(source_state[key].shape)} != {variant} "
                             f"{tuple(value.shape)}")
        loaded.append(key)
    state = {k: source_state[k] for k in loaded}
    model.load_state_dict(state, strict=False)  # exactly the transferred prefixes; the rest keeps its initialisation
    skipped = tuple(k for k in source_state if k not in state)
    model.trunk_transfer = TrunkTransfer(tuple(loaded), skipped, tuple(initialised))
    logger.info("%s: copied %d tensors; skipped %d source tensors (%s); newly initialised: %s", variant,
                len(loaded), len(skipped), ", ".join(skipped), ", ".join(initialised))
    return model.train(source.training)


# deepmind/language-perceiver's trunk with a 2-label classification decoder
_NOTES = ("No official fine-tuned weights. Start from the masked LM with from_language_model(...) "
          "(transformers: PerceiverForSequenceClassification.from_pretrained('deepmind/language-perceiver')); "
          "GLUE dev average 80.95 after fine-tuning, arXiv 2107.14795 v3 Tab. 14. num_params: num_labels=2 "
          "(equal to transformers' count for deepmind/language-perceiver's config).")


@register_model(
    pretrained=PretrainedCfg(task="text-classification", input_size=(2048,), num_params=206_098_690,
                             notes=_NOTES),
    tiny={"vocab_size": 262, "max_position_embeddings": 16, "d_model": 16, "d_latents": 24, "num_latents": 6,
          "num_self_attends_per_block": 2, "num_self_attention_heads": 2, "num_cross_attention_heads": 2,
          "qk_channels": 8, "v_channels": 24, "num_labels": 3},
)
def language_perceiver_classifier(**overrides: Any) -> SequenceClassifier:
    """The language Perceiver's trunk (256 × 1280 latents, 26 layers, d_model 768) + one classification query."""
    return SequenceClassifier(config_from_overrides(SequenceClassificationConfig, {}, overrides))
