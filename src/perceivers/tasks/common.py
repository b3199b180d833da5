"""Pieces shared by the task builders: the trunk (encoder) config and its encoder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import PerceiverEncoder, PerceiverIOOutput
from ..layers.attention import Attention
from ..validation import check_count, check_tensor, is_int

__all__ = [
    "PROBLEM_TYPES",
    "LabelNames",
    "SavesPretrained",
    "TrunkConfig",
    "as_pair",
    "as_tuple",
    "build_encoder",
    "check_d_model",
    "check_labels",
    "check_problem_type",
    "check_unsupported",
    "classification_loss",
    "one_input",
    "output_flags",
    "set_attention_dropout",
    "transformers_tuple",
]

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def as_tuple(value: Sequence[int] | None, name: str = "value") -> tuple[int, ...] | None:
    """JSON lists → tuples (configs round-trip through JSON); a string, a bool or a non-int entry is a
    ``TypeError`` naming ``name`` (``"12"`` was read as ``(1, 2)``)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(map(is_int, value)):
        raise TypeError(f"{name} must be a list of ints, got {value!r} ({type(value).__name__})")
    return tuple(int(v) for v in value)


def as_pair(value: int | Sequence[int], name: str = "value") -> tuple[int, int]:
    """``224`` → ``(224, 224)``; ``(H, W)`` unchanged; anything else is an error naming ``name``."""
    if is_int(value):
        return (int(value), int(value))
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or [height, width], got {value!r}")
    pair = as_tuple(value, name)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or [height, width], got {value!r}")
    return pair


@dataclass
class TrunkConfig:
    """Encoder fields shared by every task, and the call's defaults (names as transformers' ``PerceiverConfig``).

    Attributes:
        num_latents, d_latents: the latent array ``[num_latents, d_latents]``.
        num_blocks: applications of the shared self-attention stack.
        num_self_attends_per_block: self-attention layers in the stack.
        num_self_attention_heads, num_cross_attention_heads: encoder heads.
        qk_channels, v_channels: q/k and v widths of the encoder attentions (``None``: DeepMind defaults).
        cross_attention_widening_factor, self_attention_widening_factor: MLP widening.
        cross_attention_shape_for_attention: default cross-attention q/k width from ``"kv"`` or ``"q"``
            (transformers' field; as there, it also sets the flow and multimodal decoders', whose queries
            are wider than the latents).
        use_query_residual: latent residual around the encoder cross-attention.
        dropout: attention-weight and MLP dropout in training, encoder's and decoder's (0 in every official
            model).
        attention_probs_dropout_prob: dropout on the attention probabilities of every attention, encoder's
            and decoder's, in training (transformers' field, which ``numerics="transformers"`` takes over from
            a checkpoint; transformers has no other dropout); ``None``: ``dropout``'s, where that applies.
        hidden_act: MLP activation of encoder and decoder: ``"gelu_tanh"`` (official, ``jax.nn.gelu``)
            or ``"gelu"`` (exact erf, what transformers' port computes).
        output_attentions, output_hidden_states, return_dict: defaults of the forward keywords of the same
            names (transformers' config fields); an argument given to the call wins.
    """

    num_latents: int = 256
    d_latents: int = 1280
    num_blocks: int = 1
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_attention_widening_factor: int = 1
    self_attention_widening_factor: int = 1
    cross_attention_shape_for_attention: str = "kv"
    use_query_residual: bool = True
    dropout: float = 0.0
    attention_probs_dropout_prob: float | None = None
    hidden_act: str = "gelu_tanh"
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True

    def __post_init__(self) -> None:
        """Sizes are positive (a negative one failed inside torch, "negative dimension")."""
        check_count(num_latents=self.num_latents, d_latents=self.d_latents, num_blocks=self.num_blocks,
                    num_self_attention_heads=self.num_self_attention_heads,
                    num_cross_attention_heads=self.num_cross_attention_heads,
                    cross_attention_widening_factor=self.cross_attention_widening_factor,
                    self_attention_widening_factor=self.self_attention_widening_factor)
        check_count(minimum=0, num_self_attends_per_block=self.num_self_attends_per_block)
        for name in ("qk_channels", "v_channels"):
            if getattr(self, name) is not None:
                check_count(**{name: getattr(self, name)})


class LabelNames:
    """transformers' ``config.id2label`` / ``config.label2id`` for a config with ``num_labels`` and ``labels``.

    ``labels`` (a dataclass field of the config: class names in logit order, or ``None``) gives the names;
    ``None`` means transformers' defaults ``LABEL_0``, ``LABEL_1``, … (subclasses may name a default set).
    """

    num_labels: int
    labels: tuple[str, ...] | None

    def default_labels(self) -> tuple[str, ...] | None:
        """Names used when ``labels`` is ``None`` (``None``: transformers' ``LABEL_i``)."""
        return None

    @property
    def id2label(self) -> dict[int, str]:
        """``{class index: name}``, transformers' ``config.id2label``."""
        names = self.labels if self.labels is not None else self.default_labels()
        if names is None:
            return {i: f"LABEL_{i}" for i in range(self.num_labels)}
        return dict(enumerate(names))

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: class index}``, transformers' ``config.label2id`` (a repeated name keeps its last index)."""
        return {name: i for i, name in self.id2label.items()}


def check_labels(labels: Any, num_labels: int) -> tuple[str, ...] | None:
    """A config's ``labels`` field: ``None`` or ``num_labels`` names (JSON lists become tuples)."""
    if labels is None:
        return None
    if isinstance(labels, str) or not all(isinstance(n, str) for n in labels):
        raise TypeError(f"labels must be a sequence of class names (str), got {labels!r:.80}")
    names = tuple(labels)
    if len(names) != num_labels:
        raise ValueError(f"labels has {len(names)} names but num_labels={num_labels}")
    return names


def check_d_model(d_model: int | None, channels: int) -> None:
    """transformers' configs carry the preprocessed width as ``d_model``; it must agree with ours."""
    if d_model is not None and d_model != channels:
        raise ValueError(f"d_model={d_model} does not match the preprocessor's output width {channels}")


def set_attention_dropout(model: nn.Module, p: float | None) -> None:
    """Dropout ``p`` on the attention probabilities of every attention layer in ``model`` (training only), as
    transformers' ``attention_probs_dropout_prob``; ``None`` leaves them as built."""
    if p is None:
        return
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"attention_probs_dropout_prob must be a probability in [0, 1] or None, got {p!r}")
    for module in model.modules():
        if isinstance(module, Attention):
            module.dropout = float(p)


def output_flags(config: Any, output_hidden_states: bool | None, output_attentions: bool | None,
                 return_dict: bool | None) -> tuple[bool, bool, bool]:
    """``(output_hidden_states, output_attentions, return_dict)`` of a call: each argument given, else the
    config's field of that name (transformers' rule)."""
    def pick(value: bool | None, name: str) -> bool:
        return bool(getattr(config, name) if value is None else value)

    return (pick(output_hidden_states, "output_hidden_states"), pick(output_attentions, "output_attentions"),
            pick(return_dict, "return_dict"))


def build_encoder(cfg: TrunkConfig, input_channels: int) -> PerceiverEncoder:
    """The :class:`~perceivers.io.PerceiverEncoder` described by ``cfg``."""
    return PerceiverEncoder(
        input_channels,
        num_latents=cfg.num_latents,
        latent_channels=cfg.d_latents,
        num_blocks=cfg.num_blocks,
        num_self_attends_per_block=cfg.num_self_attends_per_block,
        num_cross_attention_heads=cfg.num_cross_attention_heads,
        num_self_attention_heads=cfg.num_self_attention_heads,
        qk_channels=cfg.qk_channels,
        v_channels=cfg.v_channels,
        cross_attention_widening_factor=cfg.cross_attention_widening_factor,
        self_attention_widening_factor=cfg.self_attention_widening_factor,
        use_query_residual=cfg.use_query_residual,
        cross_attention_shape_for_attn=cfg.cross_attention_shape_for_attention,
        dropout=cfg.dropout,
        activation=cfg.hidden_act,
    )


# --------------------------------------------------------------------- transformers' calling convention


class SavesPretrained:
    """``model.save_pretrained(directory)``, the method transformers' models have (our format)."""

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Path:
        """:func:`perceivers.save_pretrained` (``config.json`` + ``model.safetensors``, our format); for
        transformers' format use :func:`perceivers.convert.transformers.save_transformers`."""
        from ..hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)


def one_input(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """The main input, given under exactly one of its two names (ours and transformers')."""
    if (value is None) == (alias_value is None):
        got = "neither" if value is None else "both"
        raise ValueError(f"pass exactly one of {name}= / {alias}= (the same input), got {got}")
    return value if alias_value is None else alias_value


def check_unsupported(head_mask: Tensor | None = None, interpolate_pos_encoding: bool = False) -> None:
    """transformers keywords we accept but cannot honour, refused when they would change the result."""
    if head_mask is not None:
        raise ValueError("head_mask is not supported (transformers 5 removed it from the Perceiver too); "
                         "mask heads by editing the attention weights instead")
    if interpolate_pos_encoding:
        raise ValueError("interpolate_pos_encoding=True is not supported: Fourier-position models take any image "
                         "size as they are; the learned-position model needs its training size")


def transformers_tuple(loss: Tensor | None, logits: Any, out: PerceiverIOOutput) -> tuple:
    """What transformers' Perceiver heads return with ``return_dict=False``.

    ``(loss?, logits, hidden_states?, attentions?, encoder cross-attentions?, *decoder cross-attentions)``:
    absent entries are left out, the encoder's cross-attention is a one-tensor tuple, and the decoder's
    cross-attention weights follow as loose tensors (transformers appends them to the tuple, not to
    the cross-attention tuple, in this mode).
    """
    head = () if loss is None else (loss,)
    groups = (out.hidden_states, out.attentions, None if out.cross_attentions is None else out.cross_attentions[:1])
    rest = tuple(g for g in groups if g is not None)
    decoder = () if out.cross_attentions is None else tuple(out.cross_attentions[1:])
    return (*head, logits, *rest, *decoder)


def check_problem_type(problem_type: str | None) -> None:
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES} or None, got {problem_type!r}")


def classification_loss(logits: Tensor, labels: Tensor, problem_type: str | None = None) -> Tensor:
    """transformers' classification/regression loss for ``logits [B, num_labels]``.

    ``problem_type`` ``None`` picks one per call as transformers does on its first call: regression
    (MSE) for one label, single-label cross-entropy for integer labels ``[B]``, multi-label BCE with
    logits otherwise (labels ``[B, num_labels]``).
    """
    check_tensor(labels, "labels", kind=None, ndim=(1, 2), layout="[batch] or [batch, num_labels]")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels have batch size {labels.shape[0]}, logits {logits.shape[0]}")
    n = logits.shape[-1]
    kind = problem_type
    if kind is None:
        integer = labels.dtype in (torch.int64, torch.int32)
        kind = "regression" if n == 1 else "single_label_classification" if integer else "multi_label_classification"
    if kind == "regression":
        target = labels.to(logits.dtype)
        return F.mse_loss(logits.squeeze(-1), target.squeeze(-1)) if n == 1 else F.mse_loss(logits, target)
    if kind == "single_label_classification":
        if labels.is_floating_point() or labels.numel() != logits.shape[0]:
            raise ValueError(f"single-label classification needs integer class ids [batch], got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        return F.cross_entropy(logits, labels.reshape(-1).long())
    if tuple(labels.shape) != tuple(logits.shape):
        raise ValueError(f"multi-label classification needs labels of shape {tuple(logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
