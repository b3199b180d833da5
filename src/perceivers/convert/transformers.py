"""transformers' Perceiver checkpoints ⇄ perceivers task models.

A transformers checkpoint is a directory (or Hub repo) with ``config.json`` (``model_type:
"perceiver"``, ``architectures: ["PerceiverFor…"]``) and ``model.safetensors`` or
``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``). Its config picks the registered
variant and its sizes (:func:`overrides_from_config`); its tensors are renamed by the declarative
tables :data:`TABLES` (one ``(transformers, perceivers)`` template pair per tensor family; every
tensor must match exactly one rule and every model tensor must be given).

Two numerics, chosen with ``numerics=``:

- ``"deepmind"`` (default) — the official architecture, undoing what transformers' port changed:
  tanh GELU (transformers: exact erf), TF-``SAME`` conv stem with a padded max-pool (56×56 tokens;
  transformers: symmetric padding, unpadded pool, 55×55), no decoder query residual in the
  learned-position classifier (transformers: residual), and the 7×7 stem kernel's H/W axes swapped
  back (transformers' Haiku converter transposed the HWIO kernel with a plain ``np.transpose``;
  ``undo_conv_transpose=False`` keeps the kernel as stored, e.g. for checkpoints trained in transformers).
- ``"transformers"`` — reproduce transformers' outputs: exact GELU (per ``hidden_act``), its conv
  stem, its decoder residual, the kernel as stored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..hf_config import check_field_types, model_defaults
from ..safe_files import read_json
from .state_dict import (
    CheckpointError,
    Rule,
    adopt_checkpoint_dtype,
    load_state_dict_strict,
    read_state_dict,
    rename_by_rules,
    save_state_dict,
)

__all__ = [
    "ARCHITECTURES",
    "TABLES",
    "convert_transformers_state_dict",
    "from_transformers",
    "load_transformers_weights",
    "overrides_from_config",
    "read_transformers_checkpoint",
    "rename_state_dict",
    "save_transformers",
    "stem_uses_transformers_kernel",
    "to_transformers_state_dict",
    "transformers_config",
    "use_transformers_numerics",
]

Numerics = Literal["deepmind", "transformers"]

#: transformers head class → our registered variant.
ARCHITECTURES: dict[str, str] = {
    "PerceiverForMaskedLM": "language-perceiver",
    "PerceiverForSequenceClassification": "language-perceiver-classifier",
    "PerceiverForImageClassificationLearned": "vision-perceiver-learned",
    "PerceiverForImageClassificationFourier": "vision-perceiver-fourier",
    "PerceiverForImageClassificationConvProcessing": "vision-perceiver-conv",
    "PerceiverForOpticalFlow": "optical-flow-perceiver",
    "PerceiverForMultimodalAutoencoding": "multimodal-perceiver",
}

# ------------------------------------------------------------------------------------------ key tables
# Templates: {i} an index, {m} a modality name, {p} a parameter/buffer name.

def _layer(hf: str, ours: str, *, cross: bool) -> list[Rule]:
    """A transformers ``PerceiverLayer`` ⇄ our ``CrossAttentionBlock`` / ``SelfAttentionBlock``."""
    rules = [
        ("attention.self.layernorm1", "norm_q" if cross else "norm"),
        ("attention.self.query", "attn.to_q"),
        ("attention.self.key", "attn.to_k"),
        ("attention.self.value", "attn.to_v"),
        ("attention.output.dense", "attn.to_out"),
        ("layernorm", "norm_mlp"),
        ("mlp.dense1", "mlp.fc1"),
        ("mlp.dense2", "mlp.fc2"),
    ]
    if cross:
        rules.append(("attention.self.layernorm2", "norm_kv"))
    return [(f"{hf}.{a}.{{p}}", f"{ours}.{b}.{{p}}") for a, b in rules]


def under(hf_prefix: str, ours_prefix: str, rules: list[Rule]) -> list[Rule]:
    """``rules`` of a sub-module, placed under a prefix on each side (``"perceiver.decoder."``, …)."""
    return [(hf_prefix + hf, ours_prefix + ours) for hf, ours in rules]


# Rules of one module, relative to it: transformers' module (left) ⇄ ours (right). The head tables below
# and the generic ``perceivers.hf.PerceiverModel`` (``transformers_rules()`` of each building block) are
# assembled from these.

#: ``PerceiverModel``'s own tensors: the latents and the encoder.
ENCODER_RULES: list[Rule] = [
    ("embeddings.latents", "encoder.latents.embeddings"),
    *_layer("encoder.cross_attention", "encoder.cross_attention", cross=True),
    *_layer("encoder.self_attends.{i}", "encoder.self_attends.{i}", cross=False),
]

#: ``PerceiverTextPreprocessor`` ⇄ :class:`~perceivers.io.processors.TextPreprocessor`.
TEXT_RULES: list[Rule] = [
    ("embeddings.weight", "embeddings.weight"),
    ("position_embeddings.weight", "position_embeddings.embeddings"),
]

#: ``PerceiverImagePreprocessor`` stems ⇄ :class:`~perceivers.io.processors.ImagePreprocessor`.
CONV1X1_RULES: list[Rule] = [("convnet_1x1.{p}", "stem.{p}")]
CONV_RULES: list[Rule] = [("convnet.conv.weight", "stem.layers.0.conv.weight"),
                          ("convnet.batchnorm.{p}", "stem.layers.0.norm.{p}")]
PATCHES_LINEAR_RULES: list[Rule] = [("conv_after_patches.{p}", "patches_linear.{p}")]


def position_rules(*, trainable: bool, projected: bool) -> list[Rule]:
    """A preprocessor's ``position_embeddings`` / ``positions_projection`` ⇄ our ``position_encoding``."""
    table = "position_encoding.base.table.embeddings" if projected else "position_encoding.table.embeddings"
    rules = [("position_embeddings.position_embeddings", table)] if trainable else []
    if projected:
        rules.append(("positions_projection.{p}", "position_encoding.proj.{p}"))
    return rules


def decoder_rules(*, queries: bool = True, final_layer: bool = True) -> list[Rule]:
    """``PerceiverBasicDecoder`` ⇄ :class:`~perceivers.io.BasicDecoder`: trainable queries, the
    cross-attention, the final ``Linear``."""
    rules = [("output_position_encodings.position_embeddings", "queries.table.embeddings")] if queries else []
    rules += _layer("decoding_cross_attention", "cross_attention", cross=True)
    if final_layer:
        rules.append(("final_layer.{p}", "output.{p}"))
    return rules


#: learned per-modality vectors of the multimodal pre- and decoders (padding) and preprocessor (mask).
PADDING_RULES: list[Rule] = [("padding.{m}", "padding.{m}.embeddings")]
MASK_RULES: list[Rule] = [("mask.{m}", "mask_tokens.{m}.embeddings")]

#: ``Perceiver*Postprocessor`` ⇄ our postprocessors (one ``Linear``).
POSTPROCESSOR_RULES: list[Rule] = [("classifier.{p}", "linear.{p}")]

_TRUNK = under("perceiver.", "perceiver.", ENCODER_RULES)
_PRE = "perceiver.input_preprocessor."
_TEXT = under(_PRE, _PRE, TEXT_RULES)
_CLASSIFIER = under("perceiver.decoder.decoder.", "perceiver.decoder.decoder.", decoder_rules())
_CONV_KERNEL = _PRE + CONV_RULES[0][1]

#: transformers head class → its (transformers, perceivers) key templates.
TABLES: dict[str, list[Rule]] = {
    "PerceiverForMaskedLM": [
        *_TEXT,
        *_TRUNK,
        *under("perceiver.decoder.", "perceiver.decoder.", decoder_rules(final_layer=False)),
        ("embedding_decoder.bias", "embedding_decoder.bias"),
    ],
    "PerceiverForSequenceClassification": [*_TEXT, *_TRUNK, *_CLASSIFIER],
    "PerceiverForImageClassificationLearned": [
        *under(_PRE, _PRE, CONV1X1_RULES + position_rules(trainable=True, projected=True)),
        *_TRUNK,
        *_CLASSIFIER,
    ],
    "PerceiverForImageClassificationFourier": [*_TRUNK, *_CLASSIFIER],
    "PerceiverForImageClassificationConvProcessing": [*under(_PRE, _PRE, CONV_RULES), *_TRUNK, *_CLASSIFIER],
    "PerceiverForOpticalFlow": [
        *under(_PRE, _PRE, PATCHES_LINEAR_RULES),
        *_TRUNK,
        *under("perceiver.decoder.decoder.", "perceiver.decoder.decoder.", decoder_rules(queries=False)),
    ],
    "PerceiverForMultimodalAutoencoding": [
        *under(_PRE, _PRE, PADDING_RULES + MASK_RULES),
        *_TRUNK,
        ("perceiver.decoder.modalities.label.decoder.output_position_encodings.position_embeddings",
         "perceiver.decoder.queries.label.table.embeddings"),
        *under("perceiver.decoder.", "perceiver.decoder.", PADDING_RULES),
        *under("perceiver.decoder.decoder.", "perceiver.decoder.decoder.", decoder_rules(queries=False)),
        *under("perceiver.output_postprocessor.modalities.{m}.", "perceiver.output_postprocessor.modalities.{m}.",
               POSTPROCESSOR_RULES),
    ],
}



def _swap_hw(kernel: Tensor) -> Tensor:
    """OIHW kernel with H and W exchanged (undoes / redoes transformers' ``np.transpose`` of HWIO)."""
    return kernel.transpose(-1, -2).contiguous()


def rename_state_dict(state: Mapping[str, Tensor], rules: list[Rule], *, reverse: bool, what: str,
                      swap_conv: bool = False) -> dict[str, Tensor]:
    """Rename every tensor of ``state`` by ``rules`` (transformers → ours, or ours → transformers with
    ``reverse``); a tensor that no rule names is a :class:`CheckpointError` (``what`` names the table)."""

    def swap(key: str, new: str, value: Tensor) -> Tensor:
        return _swap_hw(value) if swap_conv and _CONV_KERNEL in (key, new) else value

    return rename_by_rules(state, rules, what=what, source="perceivers" if reverse else "transformers",
                           reverse=reverse, transform=swap)


def _map(state: Mapping[str, Tensor], architecture: str, *, reverse: bool, swap_conv: bool) -> dict[str, Tensor]:
    if architecture not in TABLES:
        raise ValueError(f"unsupported transformers architecture {architecture!r}; known: {sorted(TABLES)}")
    return rename_state_dict(state, TABLES[architecture], reverse=reverse, what=architecture, swap_conv=swap_conv)


def convert_transformers_state_dict(
    state: Mapping[str, Tensor],
    model_or_architecture: nn.Module | str,
    *,
    undo_conv_transpose: bool | None = None,
) -> dict[str, Tensor]:
    """transformers tensor names → ours (strict: every tensor needs a rule).

    Args:
        model_or_architecture: a transformers head class name, or one of our registry models.
        undo_conv_transpose: swap H/W of the 7×7 stem kernel back (see the module docstring). Default: as
            the model's stem computes (swapped for DeepMind's TF-"SAME" stem, as stored for transformers'
            symmetric one, :func:`stem_uses_transformers_kernel`); True for an architecture name.
    """
    if isinstance(model_or_architecture, str):
        arch, swap = model_or_architecture, True
    else:
        arch, swap = _architecture_of(model_or_architecture), not stem_uses_transformers_kernel(model_or_architecture)
    return _map(state, arch, reverse=False, swap_conv=swap if undo_conv_transpose is None else undo_conv_transpose)


def stem_uses_transformers_kernel(model: nn.Module) -> bool:
    """Whether ``model``'s conv stem pads as transformers' does (``conv_padding="symmetric"``, set by
    ``numerics="transformers"`` or :func:`use_transformers_numerics`), and so takes the 7×7 kernel in the
    orientation transformers stores; DeepMind's TF-"SAME" stem takes it H/W-swapped back."""
    from ..io.processors.image import _ConvDownsampleLayer

    paddings = {m.padding for m in model.modules() if isinstance(m, _ConvDownsampleLayer)}
    if paddings:
        return paddings == {"symmetric"}
    return getattr(getattr(model, "config", None), "conv_padding", "same") == "symmetric"


def to_transformers_state_dict(
    state: Mapping[str, Tensor], architecture: str, *, redo_conv_transpose: bool = True
) -> dict[str, Tensor]:
    """Our tensor names → transformers' (the inverse tables; the stem kernel H/W-swapped as transformers stores it)."""
    return _map(state, architecture, reverse=True, swap_conv=redo_conv_transpose)


def _architecture_of(model: nn.Module) -> str:
    name = getattr(model, "model_name", None)
    for arch, registered in ARCHITECTURES.items():
        if registered == name:
            return arch
    raise ValueError(f"{type(model).__name__} (model_name={name!r}) has no transformers counterpart; "
                     f"supported: {sorted(set(ARCHITECTURES.values()))}")


# --------------------------------------------------------------------------------------------- configs

_TRUNK_FIELDS = (
    "num_latents", "d_latents", "num_blocks", "num_self_attends_per_block", "num_self_attention_heads",
    "num_cross_attention_heads", "qk_channels", "v_channels", "cross_attention_widening_factor",
    "self_attention_widening_factor", "cross_attention_shape_for_attention", "use_query_residual",
)


#: transformers' defaults of the forward's flags, which a config.json may change (as our configs' fields)
_OUTPUT_FLAGS = {"output_attentions": False, "output_hidden_states": False, "return_dict": True}

# transformers' hidden_act → our activation names
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _num_labels(cfg: Mapping[str, Any]) -> int:
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    return int(cfg.get("num_labels", 2))


def _labels(cfg: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The class names of ``id2label`` (keys ``"0"`` in config.json, ``0`` in a ``PerceiverConfig``) in index
    order; ``None`` when absent."""
    id2label = cfg.get("id2label")
    if not id2label:
        return None
    by_index = {int(k): str(v) for k, v in id2label.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"id2label must number the classes 0..{len(by_index) - 1}, got keys {sorted(by_index)[:8]}…")
    return tuple(by_index[i] for i in range(len(by_index)))


def _id2label(c: Any) -> dict[str, Any]:
    """``id2label`` / ``label2id`` of a config.json for a config with ``id2label``."""
    names = c.id2label
    return {"id2label": {str(i): n for i, n in names.items()}, "label2id": {n: i for i, n in names.items()}}


def architecture_of_config(cfg: Mapping[str, Any]) -> str:
    """The head class named by ``architectures`` in a transformers config."""
    if cfg.get("model_type") != "perceiver":
        raise ValueError(f"not a transformers Perceiver config (model_type={cfg.get('model_type')!r})")
    archs = [a for a in cfg.get("architectures") or [] if a in ARCHITECTURES]
    if len(archs) != 1:
        raise ValueError(f"config.json names architectures {cfg.get('architectures')}; need exactly one of "
                         f"{sorted(ARCHITECTURES)} (pass architecture=...)")
    return archs[0]


def overrides_from_config(
    cfg: Mapping[str, Any], architecture: str, numerics: Numerics = "deepmind"
) -> tuple[str, dict[str, Any]]:
    """``(registry name, create_model overrides)`` equivalent to a transformers config.

    The sizes transformers hard-codes per head (64 Fourier bands, 256-wide learned-position stem, 8×32
    decoder heads of the MLM, …) are written out here. The forward's flags (``output_attentions``,
    ``output_hidden_states``, ``return_dict``) are taken over; with ``numerics="transformers"`` so are
    ``hidden_act`` and ``attention_probs_dropout_prob``.

    Raises:
        TypeError: a field of transformers' ``PerceiverConfig`` has a value of the wrong type (e.g. ``"256"``).
    """
    check_field_types(cfg)
    c = {**model_defaults(), **cfg}  # transformers' defaults for the fields a config.json omits
    name = ARCHITECTURES[architecture]
    over: dict[str, Any] = {k: c[k] for k in _TRUNK_FIELDS}
    over.update({k: cfg[k] for k in _OUTPUT_FLAGS if k in cfg})
    if numerics == "transformers":
        if c["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        over["hidden_act"] = _ACTIVATIONS[c["hidden_act"]]
        over["attention_probs_dropout_prob"] = c["attention_probs_dropout_prob"]
    if architecture == "PerceiverForMaskedLM":
        over.update(vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
                    d_model=c["d_model"], num_decoder_heads=8, decoder_qk_channels=8 * 32, decoder_v_channels=c["d_model"])
    elif architecture == "PerceiverForSequenceClassification":
        over.update(vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
                    d_model=c["d_model"], num_labels=_num_labels(c), num_decoder_heads=1, decoder_query_residual=True)
    elif architecture.startswith("PerceiverForImageClassification"):
        over.update(num_labels=_num_labels(c))
        if architecture.endswith("Learned"):
            side = int(c["image_size"])
            over.update(image_size=(side, side), preprocessor_channels=256, position_channels=256, project_pos_dim=256,
                        decoder_query_residual=numerics == "transformers")
        elif architecture.endswith("Fourier"):
            over.update(image_size=(224, 224), num_bands=64, max_resolution=(224, 224))
        else:
            over.update(image_size=(224, 224), preprocessor_channels=64, num_bands=64, max_resolution=(56, 56))
            if numerics == "transformers":
                over["conv_padding"] = "symmetric"
    elif architecture == "PerceiverForOpticalFlow":
        over.update(train_size=tuple(c["train_size"]), num_bands=64, preprocessor_channels=64)
    elif architecture == "PerceiverForMultimodalAutoencoding":
        out_shape = tuple(c["output_shape"])
        if len(out_shape) != 4 or out_shape[1] != c["num_frames"]:
            raise ValueError(f"output_shape {out_shape} must be (1, num_frames, H, W)")
        image_size = tuple(out_shape[2:])
        if numerics == "transformers" and (image_size[0] // 4 != c["image_size"] or image_size[1] // 4 != c["image_size"]):
            # transformers takes the video Fourier max_resolution from image_size; DeepMind (and we) from the
            # 4× patch grid — equal for the released checkpoint (image_size 56, output 224)
            raise ValueError(
                f"image_size={c['image_size']} must be output_shape[-2:]/4 = {image_size[0] // 4} (the patch grid "
                "that sets the video Fourier frequencies) to reproduce transformers' numerics"
            )
        over.update(num_frames=c["num_frames"], image_size=image_size, audio_samples_per_frame=c["audio_samples_per_frame"],
                    samples_per_patch=c["samples_per_patch"], num_labels=_num_labels(c),
                    output_num_channels=c["output_num_channels"],
                    label_query_channels=c["_label_trainable_num_channels"], image_patch_size=4, image_num_bands=32,
                    audio_num_bands=192, min_padding_size=4, decoder_min_padding_size=2)
    if architecture == "PerceiverForMaskedLM" and numerics == "transformers":
        over["decoder_query_mask"] = False  # transformers decodes padded positions like real ones
    if "num_labels" in over:
        over["labels"] = _labels(c)  # config.id2label (transformers' names, e.g. ImageNet's for deepmind/*)
    if c.get("problem_type") and (architecture == "PerceiverForSequenceClassification"
                                  or architecture.startswith("PerceiverForImageClassification")):
        over["problem_type"] = c["problem_type"]  # the loss used with labels=
    return name, over


#: config fields of a deeper decoder and their values in transformers' (one-layer) decoders.
_ONE_LAYER_DECODER = {"decoder_num_cross_attends": 1, "decoder_num_self_attends_per_cross": 0}


def transformers_config(model: nn.Module) -> dict[str, Any]:
    """A transformers ``config.json`` (as a dict) for one of our registry models.

    Raises ``ValueError`` when the model uses sizes transformers cannot express (it hard-codes several).
    """
    arch = _architecture_of(model)
    c = model.config
    deeper = {k: getattr(c, k) for k, default in _ONE_LAYER_DECODER.items() if getattr(c, k, default) != default}
    if deeper:
        raise ValueError(f"{model.model_name} cannot be written in transformers' format: its decoders have one "
                         f"cross-attention and no query self-attention (model has {deeper})")
    # the model's own activation (DeepMind's tanh GELU is transformers' "gelu_new"), attention dropout and flags
    attention_dropout = c.dropout if c.attention_probs_dropout_prob is None else c.attention_probs_dropout_prob
    cfg: dict[str, Any] = {"model_type": "perceiver", "architectures": [arch],
                           "hidden_act": "gelu" if c.hidden_act == "gelu" else "gelu_new",
                           "attention_probs_dropout_prob": float(attention_dropout)}
    cfg.update({k: getattr(c, k) for k in _TRUNK_FIELDS})
    cfg.update({k: getattr(c, k) for k, default in _OUTPUT_FLAGS.items() if getattr(c, k) != default})
    _, expected = overrides_from_config({**cfg, **_config_extras(c, arch)}, arch)
    expected.update(_hard_coded(c, arch))
    # compare what the model computes with: a None field means its default (e.g. max_resolution = the token grid)
    mismatched = {k: (getattr(c, k, None), _effective(c, k), v) for k, v in expected.items()
                  if not (k == "decoder_query_residual" and arch.endswith("Learned")) and k != "labels"
                  and _effective(c, k) != _norm(v)}
    fixes = [f"{k}={want!r} ({_WHY.get(k, '')}model has {_describe(raw, got)})"
             for k, (raw, got, want) in mismatched.items()]
    if c.d_latents % c.num_cross_attention_heads:  # its encoder checks this whatever the attention widths
        fixes.append(f"num_cross_attention_heads dividing d_latents={c.d_latents} "
                     f"(model has {c.num_cross_attention_heads})")
    if fixes:
        raise ValueError(f"{model.model_name} cannot be written in transformers' format: transformers fixes "
                         + ", ".join(fixes))
    cfg.update(_config_extras(c, arch))
    return cfg


#: why transformers fixes a field to a value that is not a constant (opens the "model has" part of the error)
_WHY = {"v_channels": "= d_latents, its self-attentions' output width; "}

_IMAGE_PREPROCESSING = {"PerceiverForImageClassificationLearned": ("conv1x1", "trainable", 1),
                        "PerceiverForImageClassificationFourier": ("pixels", "fourier", 1),
                        "PerceiverForImageClassificationConvProcessing": ("conv", "fourier", 4)}


def _hard_coded(c: Any, arch: str) -> dict[str, Any]:
    """What transformers' ``arch`` hard-codes beyond :func:`overrides_from_config`'s sizes, where our models
    may differ (their defaults agree): checked by :func:`transformers_config`, never written."""
    fixed: dict[str, Any] = {"v_channels": c.d_latents}  # the self-attentions' value width (see _effective)
    if arch in _IMAGE_PREPROCESSING:
        preprocessing, position_encoding, downsample = _IMAGE_PREPROCESSING[arch]
        fixed.update(preprocessing=preprocessing, position_encoding=position_encoding, spatial_downsample=downsample,
                     concat_or_add_pos="concat", in_channels=3, num_decoder_heads=1, decoder_query_channels=c.d_latents,
                     decoder_query_residual=True)
    elif arch == "PerceiverForOpticalFlow":  # its Fourier frequencies come from train_size
        fixed.update(max_resolution=tuple(c.train_size), num_decoder_heads=1, decoder_query_residual=False,
                     rescale_factor=100.0)
    elif arch == "PerceiverForMultimodalAutoencoding":
        fixed.update(in_channels=3, num_decoder_heads=1, decoder_query_residual=False)
    elif arch == "PerceiverForMaskedLM":
        fixed["decoder_query_residual"] = False
    return fixed


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _effective(c: Any, key: str) -> Any:
    """The value of config field ``key`` the built model uses: ``None`` resolved as the task models resolve it."""
    value = getattr(c, key, None)
    if value is not None:
        return _norm(value)
    if key == "max_resolution":  # image classifiers: the token grid; optical flow: train_size
        grid = c.token_grid if hasattr(c, "token_grid") else getattr(c, "train_size", None)
        return _norm(grid)
    if key == "decoder_qk_channels":  # MLM decoder: qk_channels, else BasicDecoder's default (d_latents)
        return c.qk_channels if c.qk_channels is not None else c.d_latents
    if key == "decoder_v_channels":  # MLM decoder: d_model
        return c.d_model
    if key == "decoder_query_channels":  # image classifiers: d_latents
        return c.d_latents
    if key == "v_channels":  # the self-attentions' value width: qk_channels, else d_latents
        return c.qk_channels if c.qk_channels is not None else c.d_latents
    return None


def _describe(raw: Any, effective: Any) -> str:
    if raw is None and effective is not None:
        return f"None, i.e. {effective!r}"
    return repr(_norm(raw))


def _config_extras(c: Any, arch: str) -> dict[str, Any]:
    if arch == "PerceiverForMaskedLM":
        return {"vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings, "d_model": c.d_model}
    if arch == "PerceiverForSequenceClassification":
        text = {"vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings, "d_model": c.d_model,
                **_id2label(c)}
        return text if c.problem_type is None else {**text, "problem_type": c.problem_type}
    if arch.startswith("PerceiverForImageClassification"):
        extra: dict[str, Any] = _id2label(c)
        if arch.endswith("Learned"):
            extra["image_size"] = c.image_size[0]
        return extra if c.problem_type is None else {**extra, "problem_type": c.problem_type}
    if arch == "PerceiverForOpticalFlow":
        return {"train_size": list(c.train_size)}
    return {"num_frames": c.num_frames, "image_size": c.image_size[0] // 4,
            "output_shape": [1, c.num_frames, *c.image_size], "audio_samples_per_frame": c.audio_samples_per_frame,
            "samples_per_patch": c.samples_per_patch, "output_num_channels": c.output_num_channels,
            "_label_trainable_num_channels": c.label_query_channels, **_id2label(c)}


# ------------------------------------------------------------------------------------------- numerics


def use_transformers_numerics(model: nn.Module, hidden_act: str = "gelu") -> nn.Module:
    """Switch a model to transformers' computation where it departs from DeepMind (in place).

    Every MLP uses ``hidden_act`` (``"gelu"`` exact; ``"gelu_new"``/``"gelu_pytorch_tanh"`` tanh) and conv
    stems pad and pool as transformers does (``conv_padding="symmetric"``). Weights are untouched.
    :func:`from_transformers` sets the same through the config instead (activation, conv padding, the
    learned-position decoder residual), so they are saved with the model; a change made here is not.
    """
    from ..io.processors.image import _ConvDownsampleLayer
    from ..layers import FeedForward

    if hidden_act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {hidden_act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    for module in model.modules():
        if isinstance(module, FeedForward):
            module.activation = _ACTIVATIONS[hidden_act]
        elif isinstance(module, _ConvDownsampleLayer):
            module.padding = "symmetric"
    return model


# ------------------------------------------------------------------------------------------ read/write


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    return read_json(path)


def read_transformers_checkpoint(directory: str | os.PathLike[str], *,
                                 map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state_dict)`` of a transformers checkpoint directory (safetensors preferred, shards joined)."""
    directory = Path(directory)
    cfg = _read_config(directory)
    if not isinstance(cfg, dict) or cfg.get("model_type") != "perceiver":
        if isinstance(cfg, dict) and cfg.get("format") == "perceivers":
            raise ValueError(f"{directory} is a perceivers-format checkpoint, not a transformers one: load it with "
                             "perceivers.from_pretrained")
        found = f"model_type={cfg.get('model_type')!r}" if isinstance(cfg, dict) else f"a JSON {type(cfg).__name__}"
        raise ValueError(f"{directory} is not a transformers Perceiver checkpoint: its config.json has {found}, "
                         "expected model_type='perceiver'")
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).exists():
            return cfg, read_state_dict(directory / single, map_location=map_location)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).exists():
            return cfg, _read_shards(directory / index, map_location=map_location)
    raise FileNotFoundError(f"{directory} has no model.safetensors / pytorch_model.bin (or their index)")


def _read_shards(index: Path, *, map_location: str | torch.device) -> dict[str, Tensor]:
    """The tensors of a sharded checkpoint, checked against its index: every shard it names is a file of the
    directory, every tensor it lists is in the shard it names, and the shards hold nothing else (else
    :class:`CheckpointError` naming the index)."""
    raw = read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map of tensor name → shard file (got "
                              f"{type(weight_map).__name__ if isinstance(raw, dict) else type(raw).__name__})")
    state: dict[str, Tensor] = {}
    misplaced: list[str] = []
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file name in the checkpoint "
                                  "directory")
        if not path.is_file():
            raise CheckpointError(f"{index} names the shard {shard}, which is missing from {index.parent}")
        tensors = read_state_dict(path, map_location=map_location)
        misplaced += [f"{k} (in {shard})" for k in tensors if weight_map.get(k) != shard]
        state.update(tensors)
    lacking = sorted(k for k in weight_map if k not in state)
    if lacking:
        raise CheckpointError(f"{index} lists {len(lacking)} tensors that its shards lack: {', '.join(lacking[:12])}")
    if misplaced:
        raise CheckpointError(f"the shards hold {len(misplaced)} tensors not listed in {index} under their shard: "
                              + ", ".join(misplaced[:12]))
    return state


def from_transformers(
    path_or_id: str | os.PathLike[str],
    *,
    numerics: Numerics = "deepmind",
    undo_conv_transpose: bool | None = None,
    architecture: str | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Build our equivalent of a transformers Perceiver checkpoint and load its weights (in their dtype, as
    transformers' ``dtype="auto"``).

    Args:
        path_or_id: a directory or Hub repo id (resolved through the HF cache, offline-capable).
        numerics: ``"deepmind"`` (official computation) or ``"transformers"`` (reproduce transformers).
        undo_conv_transpose: swap the conv stem kernel's H/W back; default True with DeepMind numerics.
        architecture: the head class when ``config.json`` lacks ``architectures``.
    """
    from ..hub import resolve
    from ..tasks import create_model

    if numerics not in ("deepmind", "transformers"):
        raise ValueError(f"numerics must be 'deepmind' or 'transformers', got {numerics!r}")
    directory = resolve(path_or_id)
    cfg, state = read_transformers_checkpoint(directory, map_location=map_location)
    arch = architecture or architecture_of_config(cfg)
    name, overrides = overrides_from_config(cfg, arch, numerics)
    model = create_model(name, **overrides)
    if numerics == "transformers":
        use_transformers_numerics(model, cfg.get("hidden_act", "gelu"))
    swap = (numerics == "deepmind") if undo_conv_transpose is None else undo_conv_transpose
    converted = convert_transformers_state_dict(state, arch, undo_conv_transpose=swap)
    load_state_dict_strict(adopt_checkpoint_dtype(model, converted), converted, source=str(directory))
    return model.to(map_location).eval()


def load_transformers_weights(
    model: nn.Module,
    path_or_id: str | os.PathLike[str],
    *,
    undo_conv_transpose: bool | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a transformers checkpoint's weights into an existing registry model (strict).

    ``undo_conv_transpose`` defaults to what the model's conv stem expects (see
    :func:`convert_transformers_state_dict`), so a model built with transformers' numerics reloads its own
    checkpoint unchanged."""
    from ..hub import resolve

    directory = resolve(path_or_id)
    cfg, state = read_transformers_checkpoint(directory, map_location=map_location)
    arch = architecture_of_config(cfg) if cfg.get("architectures") else _architecture_of(model)
    if arch != _architecture_of(model):
        raise CheckpointError(f"{directory} holds a {arch}, but the model is {getattr(model, 'model_name', '?')}")
    converted = convert_transformers_state_dict(state, model, undo_conv_transpose=undo_conv_transpose)
    return load_state_dict_strict(model, converted, source=str(directory))


def save_transformers(model: nn.Module, directory: str | os.PathLike[str], *,
                      redo_conv_transpose: bool | None = None) -> Path:
    """Write a registry model as a transformers checkpoint (``config.json`` + ``model.safetensors``).

    The config names the model's activation (``hidden_act``: ``"gelu_new"`` for DeepMind's tanh GELU,
    ``"gelu"`` for the exact one) and dropout; transformers computes the rest its own way (its conv
    stem, …); the weights are the same. The stem kernel is stored H/W-swapped like transformers'
    converted checkpoints, unless the model already holds it that way (``conv_padding="symmetric"``, as
    ``numerics="transformers"`` loads it); ``redo_conv_transpose`` decides it explicitly.

    Raises:
        ValueError: the model has sizes transformers cannot express, or ``directory`` is a file.
    """
    from ..hub import _make_directory

    cfg = transformers_config(model)
    arch = cfg["architectures"][0]
    if redo_conv_transpose is None:
        redo_conv_transpose = not stem_uses_transformers_kernel(model)
    state = to_transformers_state_dict(model.state_dict(), arch, redo_conv_transpose=redo_conv_transpose)
    directory = _make_directory(directory)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    save_state_dict(state, directory / "model.safetensors")
    return directory
