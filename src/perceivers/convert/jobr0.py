"""JOBR0/PerceiverIO_Pytorch's converted official checkpoints (``.pth``) → perceivers task models.

JOBR0's port (github.com/JOBR0/PerceiverIO_Pytorch, a git-clone-only PyTorch transcription of DeepMind's
Haiku code) distributes the six official models as ``torch.save({"model_state_dict": ...})`` files.
Its modules mirror Haiku's one for one, so the rename goes through the Haiku names: for every rule of
:func:`perceivers.convert.haiku.haiku_key_table` (Haiku name → our name) :func:`jobr0_key` gives JOBR0's
key for the same tensor. JOBR0 already stores PyTorch layouts (``nn.Linear`` ``[out, in]``, ``nn.Conv2d``
OIHW, ``BatchNorm2d`` ``[C]``), so tensors are copied as they are, after a shape check.

Keys JOBR0 has and we do not need: ``num_batches_tracked``; the zero-width ``[1, 0]`` query padding
every single-modality JOBR0 model carries; the language model's second copy of the byte embedding
(``_output_postprocessors.<m>._embedding.weight``, tied to the input embedding; it must be equal).
JOBR0's ImageNet query has ``num_classes`` rows where DeepMind's has one; JOBR0's forward pass uses only
the first row, which is the one loaded.

Numerics (measured against DeepMind's code on the Haiku reference vectors, see docs/checkpoints.md):
JOBR0's MLPs use exact erf GELU where DeepMind's use the tanh approximation, so its outputs differ
from the official ones (up to ~3e-4 of the output's scale); ``create_model(..., hidden_act="gelu")`` reproduces JOBR0,
the default reproduces DeepMind. JOBR0's video autoencoder builds its image queries over a fixed
5-frame grid, which is right only for 5-frame inputs; ours follows DeepMind for any frame count.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .haiku import fit_report, haiku_key_table
from .state_dict import CheckpointError

__all__ = ["convert_jobr0_state_dict", "is_jobr0_state_dict"]

# A key every JOBR0 ``Perceiver`` has (the encoder's latent array), and the one that fixes the prefix.
_LATENTS = "_encoder.latent_pos_enc.pos_embs"


def is_jobr0_state_dict(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state``'s names are JOBR0's (its encoder's latents and cross-attention names)."""
    return any(k.endswith(_LATENTS) for k in state) and any("_encoder.cross_attend." in k for k in state)


@dataclass(frozen=True)
class _Layout:
    """What a JOBR0 state dict's names depend on besides the Haiku name."""

    modality: str  # the single modality's key ("default"; "__default" in later JOBR0 versions)
    projected: bool  # learned positions behind a PositionEncodingProjector (``_base_position_encoding``)
    multimodal: bool


# --------------------------------------------------------------------------------------------------
# Haiku name → JOBR0 name
# --------------------------------------------------------------------------------------------------

_LEAF = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias", "pos_embs": "pos_embs",
         "embeddings": "weight", "~/mean_ema/average": "running_mean", "~/var_ema/average": "running_var"}
_ATTENTION = {"linear": "proj_q", "linear_1": "proj_k", "linear_2": "proj_v", "linear_3": "final"}
_MLP = {"linear": "fc1", "linear_1": "fc2"}
_NORMS = {"cross": {"layer_norm": "layer_norm_q", "layer_norm_1": "layer_norm_kv", "layer_norm_2": "layer_norm2"},
          "self": {"layer_norm": "layer_norm1", "layer_norm_1": "layer_norm2"}}


def _index(suffix: str | None) -> int:
    """Haiku's ``name``, ``name_1``, … → 0, 1, …"""
    return int(suffix) if suffix else 0


def _block(kind: str, rest: str) -> str:
    """Inside one Haiku ``cross_attention`` / ``self_attention`` module (JOBR0's CrossAttention / SelfAttention)."""
    module, _, leaf = rest.rpartition("/")
    parts = module.split("/")
    if parts[0] == "attention" and len(parts) == 2:
        return f"attention.{_ATTENTION[parts[1]]}.{_LEAF[leaf]}"
    if parts[0] == "mlp" and len(parts) == 2:
        return f"mlp.{_MLP[parts[1]]}.{_LEAF[leaf]}"
    return f"{_NORMS[kind][module]}.{_LEAF[leaf]}"


def _rules(lay: _Layout) -> list[tuple[str, Callable[[re.Match], str]]]:
    pre = f"_multi_preprocessor._preprocessors.{lay.modality}"
    table = "_positional_encoding._base_position_encoding" if lay.projected else "_positional_encoding"
    classification_query = "label" if lay.multimodal else lay.modality
    leaf = r"(w|b|scale|offset|pos_embs|~/mean_ema/average|~/var_ema/average)"
    return [
        # Encoder ("perceiver_encoder", or "encoder" in the video model).
        (r"(?:perceiver_)?encoder/~/trainable_position_encoding/pos_embs", lambda m: _LATENTS),
        (r"(?:perceiver_)?encoder/~/cross_attention/(.+)",
         lambda m: f"_encoder.cross_attend.{_block('cross', m[1])}"),
        (r"(?:perceiver_)?encoder/~/self_attention(?:_(\d+))?/(.+)",
         lambda m: f"_encoder.self_attends.{_index(m[1])}.{_block('self', m[2])}"),
        # The one decoder (classification_decoder/~/, flow_decoder/~/, multimodal_decoder/~/ or bare).
        (r"(?:\w+/~/)?basic_decoder/cross_attention/(.+)",
         lambda m: f"_decoder.decoding_cross_attn.{_block('cross', m[1])}"),
        (r"(?:\w+/~/)?basic_decoder/output/" + leaf, lambda m: f"_decoder.final_layer.{_LEAF[m[1]]}"),
        (r"classification_decoder/~/basic_decoder/~/trainable_position_encoding/pos_embs",
         lambda m: f"_output_queries.{classification_query}._position_encoding.pos_embs"),
        (r"basic_decoder/~/trainable_position_encoding/pos_embs",
         lambda m: f"_output_queries.{lay.modality}._position_encoding.pos_embs"),
        # Image preprocessor: conv stem (+ batch norm), 1x1 conv, patch projection, learned positions.
        (r"image_preprocessor/~/conv2_d_downsample/~/conv(?:_(\d+))?/w",
         lambda m: f"{pre}.convnet.convs.{_index(m[1])}.weight"),
        (r"image_preprocessor/~/conv2_d_downsample/~/batchnorm(?:_(\d+))?/" + leaf,
         lambda m: f"{pre}.convnet.norms.{_index(m[1])}.{_LEAF[m[2]]}"),
        (r"image_preprocessor/~/conv2_d/" + leaf, lambda m: f"{pre}.convnet_1x1.{_LEAF[m[1]]}"),
        (r"image_preprocessor/patches_linear/" + leaf, lambda m: f"{pre}._conv_after_patch_layer.{_LEAF[m[1]]}"),
        (r"image_preprocessor/~_build_network_inputs/position_encoding_projector/linear/" + leaf,
         lambda m: f"{pre}._positional_encoding._projector.{_LEAF[m[1]]}"),
        (r"image_preprocessor/~_build_network_inputs/trainable_position_encoding/pos_embs",
         lambda m: f"{pre}.{table}.pos_embs"),
        # Language model: byte embedding, input positions, output bias.
        (r"embed/embeddings", lambda m: f"{pre}.embed.weight"),
        (r"trainable_position_encoding/pos_embs", lambda m: f"{pre}.input_pos_encoding.pos_embs"),
        (r"embedding_decoder/bias", lambda m: f"_output_postprocessors.{lay.modality}.bias"),
        # Video autoencoder: per-modality padding and mask tokens, postprocessors.
        (r"multimodal_preprocessor/(\w+)_padding/pos_embs",
         lambda m: f"_multi_preprocessor.padding_embeddings.{m[1]}.pos_embs"),
        (r"multimodal_preprocessor/(\w+)_mask_token/pos_embs",
         lambda m: f"_multi_preprocessor.mask_tokens.{m[1]}.pos_embs"),
        (r"multimodal_decoder/~decoder_query/(\w+)_padding/pos_embs", lambda m: f"padding_embeddings.{m[1]}.pos_embs"),
        (r"audio_postprocessor/linear/" + leaf, lambda m: f"_output_postprocessors.audio.linear.{_LEAF[m[1]]}"),
        (r"projection_postprocessor/linear/" + leaf,
         lambda m: f"_output_postprocessors.image.projection.{_LEAF[m[1]]}"),
        (r"classification_postprocessor/linear/" + leaf, lambda m: f"_output_postprocessors.label.linear.{_LEAF[m[1]]}"),
    ]


def jobr0_key(haiku: str, layout: _Layout) -> str:
    """JOBR0's state-dict key (without the ``perceiver.`` prefix) for the Haiku parameter ``haiku``.

    Raises:
        KeyError: ``haiku`` is not a parameter JOBR0's port has.
    """
    for pattern, name in _rules(layout):
        match = re.fullmatch(pattern, haiku)
        if match:
            return name(match)
    raise KeyError(f"no JOBR0 name for the Haiku parameter {haiku!r}")


# --------------------------------------------------------------------------------------------------
# Strict conversion
# --------------------------------------------------------------------------------------------------

# The ImageNet classifiers' query. DeepMind's is one row ([1, C]); JOBR0's TrainableQuery has
# num_classes rows (filled from the one official row by broadcasting), and its ClassificationPostprocessor
# keeps output row 0 only, so row 0 is all of it that JOBR0's forward pass uses.
_CLASS_QUERY = "classification_decoder/~/basic_decoder/~/trainable_position_encoding/pos_embs"


def _layout(state: Mapping[str, Tensor]) -> tuple[str, _Layout]:
    """The prefix in front of JOBR0's ``Perceiver`` (``"perceiver."`` in its task models) and its layout."""
    prefix = next(k for k in state if k.endswith(_LATENTS))[: -len(_LATENTS)]
    names = [k[len(prefix):] for k in state if k.startswith(prefix)]
    queries = sorted({k.split(".")[1] for k in names if k.startswith("_output_queries.")})
    projected = any("._positional_encoding._projector." in k for k in names)
    return prefix, _Layout(modality=queries[0] if len(queries) == 1 else "default", projected=projected,
                           multimodal=len(queries) > 1)


def _ignored(key: str, value: Tensor, state: Mapping[str, Tensor], prefix: str, lay: _Layout) -> bool:
    """JOBR0 bookkeeping with no tensor of ours behind it (the embedding copy must equal the original)."""
    if key.endswith(".num_batches_tracked") or value.numel() == 0:
        return True
    if key.endswith("._embedding.weight") and key.startswith(f"{prefix}_output_postprocessors."):
        original = state.get(f"{prefix}_multi_preprocessor._preprocessors.{lay.modality}.embed.weight")
        if original is None or not torch.equal(original, value):
            raise CheckpointError(f"JOBR0 checkpoint: {key} should be the input embedding (they are tied in "
                                  "JOBR0's LanguagePerceiver) but differs from it or has no input embedding")
        return True
    return False


def convert_jobr0_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a JOBR0 ``model_state_dict`` into ``model``'s state dict, strictly.

    ``model`` is a task model from :func:`perceivers.create_model` built at the checkpoint's sizes.

    Raises:
        CheckpointError: naming every JOBR0 tensor the model needs but the file lacks, every JOBR0
            tensor the model has no place for, and every shape mismatch.
    """
    prefix, lay = _layout(state)
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    missing, misshaped, used = [], [], set()
    for rule in haiku_key_table(model):
        if rule.ours is None:  # Haiku's BatchNorm EMA internals; JOBR0 has num_batches_tracked instead
            continue
        key = prefix + jobr0_key(rule.haiku, lay)
        if key not in state:
            missing.append(f"{key} (→ {rule.ours})")
            continue
        used.add(key)
        value, want = state[key], target[rule.ours]
        if rule.haiku == _CLASS_QUERY and value.dim() == 2 and want.shape[0] == 1:
            value = value[:1]  # JOBR0 queries num_classes rows and keeps only the first output row
        if tuple(value.shape) != tuple(want.shape):
            misshaped.append(f"{key} {tuple(value.shape)} → {rule.ours} {tuple(want.shape)}")
            continue
        out[rule.ours] = value.detach().to(dtype=want.dtype)
    unexpected = sorted(k for k, v in state.items() if k not in used and not _ignored(k, v, state, prefix, lay))
    if missing or misshaped or unexpected:
        header = (f"JOBR0 checkpoint does not fit {type(model).__name__} (build it with create_model at the "
                  "checkpoint's sizes)")
        raise CheckpointError(fit_report(header, {
            "missing from the checkpoint": missing, "unexpected in the checkpoint": unexpected,
            "shape mismatches (checkpoint → model)": misshaped}))
    for key, value in target.items():
        if key.endswith(".num_batches_tracked"):
            out[key] = value.clone()
    return out
