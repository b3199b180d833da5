"""DeepMind's official Haiku checkpoints → perceivers task models, without jax or haiku.

Reading: :func:`read_haiku_checkpoint` unpickles with a restricted ``pickle.Unpickler`` that only
rebuilds numpy arrays and maps Haiku's mapping classes (``FlatMapping``, ``FlatMap``, ``frozendict``)
to ``dict``; any other global raises :class:`UnsafeCheckpointError` before it can run. Both top-level
layouts are accepted: ``{"params": ..., "state": ...}`` (ImageNet files) and the bare params mapping
(MLM, flow, video). The result is one flat ``{"module/path/param": ndarray}`` dict.

Mapping: declarative key tables (:func:`haiku_key_table`) list for every Haiku tensor our state-dict
key and the layout change (``linear``: ``w.T``; ``conv``: HWIO → OIHW via ``transpose(3, 2, 0, 1)``;
``squeeze``: BatchNorm ``[1, 1, 1, C]`` → ``[C]``); BatchNorm EMA ``average`` is loaded as the running
statistics, ``hidden`` and ``counter`` are listed as ignored. Loading is strict: every checkpoint
tensor used, every model tensor filled, every shape equal — otherwise :class:`HaikuCheckpointError`
names the offending keys.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

__all__ = [
    "HaikuCheckpointError",
    "KeyRule",
    "UnsafeCheckpointError",
    "haiku_key_table",
    "haiku_to_state_dict",
    "load_haiku_checkpoint",
    "read_haiku_checkpoint",
]


class UnsafeCheckpointError(ValueError):
    """The pickle refers to a global the restricted unpickler does not allow (it was not executed)."""


class HaikuCheckpointError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar


class _HaikuMapping(dict):
    """Stands in for Haiku's ``FlatMapping`` / ``FlatMap`` / ``frozendict`` (pickled as ``cls(dict)``)."""

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(
            "this Haiku mapping was pickled with its internal (jax tree) state, which cannot be read without "
            "jax; re-save the checkpoint as plain dicts (haiku.data_structures.to_mutable_dict)"
        )


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,  # protocol-2 pickles store bytes this way
    ("collections", "OrderedDict"): _HaikuMapping,
}
for _name in ("FlatMapping", "FlatMap", "frozendict"):
    for _module in ("haiku._src.data_structures", "haiku.data_structures"):
        _ALLOWED_GLOBALS[(_module, _name)] = _HaikuMapping


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to unpickle global '{module}.{name}': a Haiku checkpoint may only contain numpy arrays "
                "and (Haiku) dicts; the file is not a plain checkpoint or may be malicious"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"refusing persistent id {pid!r} in a Haiku checkpoint")


#: deepest nesting of mappings accepted (Haiku's is 3: params / module / parameter); deeper is malformed,
#: e.g. a dict that contains itself, which would otherwise recurse without end
_MAX_NESTING = 32


def _plain(tree: Any, path: str = "", depth: int = 0) -> Any:
    """Nested mappings → plain dicts; leaves must be numeric numpy arrays / scalars."""
    if isinstance(tree, Mapping):
        if depth >= _MAX_NESTING:
            raise HaikuCheckpointError(
                f"checkpoint entry {path[:120]!r} nests mappings more than {_MAX_NESTING} deep, expected a shallow tree "
                "of arrays (Haiku's: params / module / parameter); the pickle is malformed or contains itself"
            )
        return {str(k): _plain(v, f"{path}/{k}" if path else str(k), depth + 1) for k, v in tree.items()}
    if isinstance(tree, (np.ndarray, np.generic, int, float)) and not isinstance(tree, bool):
        arr = np.asarray(tree)
        if arr.dtype.kind not in "biuf":
            raise UnsafeCheckpointError(f"checkpoint entry {path!r} has dtype {arr.dtype}; expected numbers")
        return arr
    raise HaikuCheckpointError(f"checkpoint entry {path!r} is a {type(tree).__name__}, expected an array or mapping")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _source_name(source: str | os.PathLike | bytes | BinaryIO) -> str:
    if isinstance(source, (bytes, bytearray)):
        return "the given bytes"
    return str(getattr(source, "name", "a file object")) if hasattr(source, "read") else os.fspath(source)


def read_haiku_checkpoint(source: str | os.PathLike | bytes | BinaryIO) -> dict[str, np.ndarray]:
    """Read an official ``.pystate`` / ``.pickle`` file into ``{"module/path/param": ndarray}``.

    Params and state (BatchNorm EMAs) are merged into one dict; nothing is imported or executed
    beyond numpy's array reconstruction.
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            obj = _RestrictedUnpickler(io.BytesIO(source)).load()
        elif hasattr(source, "read"):
            obj = _RestrictedUnpickler(source).load()
        else:
            with open(source, "rb") as f:
                obj = _RestrictedUnpickler(f).load()
    except (UnsafeCheckpointError, HaikuCheckpointError, OSError):
        raise
    except Exception as e:  # truncated or corrupt pickle: UnpicklingError, EOFError, TypeError, ...
        raise HaikuCheckpointError(
            f"cannot read {_source_name(source)}: truncated or corrupt Haiku pickle ({type(e).__name__}: {e})"
        ) from e
    try:
        tree = _plain(obj)
    except HaikuCheckpointError as e:
        raise HaikuCheckpointError(f"{_source_name(source)}: {e}") from None
    if not isinstance(tree, dict):
        raise HaikuCheckpointError(f"expected a mapping at the top of the checkpoint, got {type(tree).__name__}")
    if "params" in tree and set(tree) <= {"params", "state"} and isinstance(tree["params"], dict):
        flat = _flatten(tree["params"])
        state = _flatten(tree.get("state") or {})
        clash = set(flat) & set(state)
        if clash:
            raise HaikuCheckpointError(f"keys present in both params and state: {sorted(clash)[:5]}")
        flat.update(state)
        return flat
    return _flatten(tree)


# --------------------------------------------------------------------------------------------------
# Key tables
# --------------------------------------------------------------------------------------------------

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda a: a,
    "linear": lambda a: a.T,  # hk.Linear w [in, out] → nn.Linear weight [out, in]
    "conv": lambda a: a.transpose(3, 2, 0, 1),  # hk.Conv2D w HWIO → nn.Conv2d weight OIHW
    "squeeze": lambda a: a.reshape(-1),  # hk.BatchNorm [1, 1, 1, C] → [C]
}


@dataclass(frozen=True)
class KeyRule:
    """One checkpoint tensor: Haiku ``module/param`` → our state-dict key (``None`` = read and ignored)."""

    haiku: str
    ours: str | None
    transform: str = "none"


def _hk(name: str, k: int) -> str:
    """Haiku's name for the ``k``-th module called ``name`` in one scope: name, name_1, name_2, …"""
    return name if k == 0 else f"{name}_{k}"


def _linear(hk: str, ours: str) -> list[KeyRule]:
    return [KeyRule(f"{hk}/w", f"{ours}.weight", "linear"), KeyRule(f"{hk}/b", f"{ours}.bias")]


def _layer_norm(hk: str, ours: str) -> list[KeyRule]:
    return [KeyRule(f"{hk}/scale", f"{ours}.weight"), KeyRule(f"{hk}/offset", f"{ours}.bias")]


def _table(hk: str, ours: str) -> list[KeyRule]:
    """``TrainablePositionEncoding`` → our ``TrainablePositionEncoding`` (``.embeddings``)."""
    return [KeyRule(f"{hk}/pos_embs", f"{ours}.embeddings")]


def _attention(hk: str, ours: str) -> list[KeyRule]:
    names = ("to_q", "to_k", "to_v", "to_out")  # Haiku: linear, linear_1, linear_2, linear_3
    return [r for k, n in enumerate(names) for r in _linear(f"{hk}/{_hk('linear', k)}", f"{ours}.{n}")]


def _mlp(hk: str, ours: str) -> list[KeyRule]:
    return _linear(f"{hk}/linear", f"{ours}.fc1") + _linear(f"{hk}/linear_1", f"{ours}.fc2")


def _cross_attention(hk: str, ours: str) -> list[KeyRule]:
    return (
        _layer_norm(f"{hk}/layer_norm", f"{ours}.norm_q")
        + _layer_norm(f"{hk}/layer_norm_1", f"{ours}.norm_kv")
        + _layer_norm(f"{hk}/layer_norm_2", f"{ours}.norm_mlp")
        + _attention(f"{hk}/attention", f"{ours}.attn")
        + _mlp(f"{hk}/mlp", f"{ours}.mlp")
    )


def _self_attention(hk: str, ours: str) -> list[KeyRule]:
    return (
        _layer_norm(f"{hk}/layer_norm", f"{ours}.norm")
        + _layer_norm(f"{hk}/layer_norm_1", f"{ours}.norm_mlp")
        + _attention(f"{hk}/attention", f"{ours}.attn")
        + _mlp(f"{hk}/mlp", f"{ours}.mlp")
    )


def _encoder(hk: str, ours: str, encoder: nn.Module) -> list[KeyRule]:
    rules = _table(f"{hk}/~/trainable_position_encoding", f"{ours}.latents")
    rules += _cross_attention(f"{hk}/~/cross_attention", f"{ours}.cross_attention")
    for k in range(len(encoder.self_attends)):
        rules += _self_attention(f"{hk}/~/{_hk('self_attention', k)}", f"{ours}.self_attends.{k}")
    return rules


def _basic_decoder(hk: str, ours: str, with_output: bool = True) -> list[KeyRule]:
    rules = _cross_attention(f"{hk}/cross_attention", f"{ours}.cross_attention")
    return rules + (_linear(f"{hk}/output", f"{ours}.output") if with_output else [])


def _image_preprocessor(pre: nn.Module, ours: str) -> list[KeyRule]:
    hk = "image_preprocessor"
    rules: list[KeyRule] = []
    if pre.prep_type == "conv":
        stem = f"{hk}/~/conv2_d_downsample/~"
        for k, layer in enumerate(pre.stem.layers):
            rules.append(KeyRule(f"{stem}/{_hk('conv', k)}/w", f"{ours}.stem.layers.{k}.conv.weight", "conv"))
            if layer.norm is not None:
                bn, norm = f"{stem}/{_hk('batchnorm', k)}", f"{ours}.stem.layers.{k}.norm"
                rules += [
                    KeyRule(f"{bn}/scale", f"{norm}.weight", "squeeze"),
                    KeyRule(f"{bn}/offset", f"{norm}.bias", "squeeze"),
                    KeyRule(f"{bn}/~/mean_ema/average", f"{norm}.running_mean", "squeeze"),
                    KeyRule(f"{bn}/~/var_ema/average", f"{norm}.running_var", "squeeze"),
                ]
                rules += [KeyRule(f"{bn}/~/{ema}/{v}", None) for ema in ("mean_ema", "var_ema")
                          for v in ("hidden", "counter")]
    elif pre.prep_type == "conv1x1":
        rules += [KeyRule(f"{hk}/~/conv2_d/w", f"{ours}.stem.weight", "conv"),
                  KeyRule(f"{hk}/~/conv2_d/b", f"{ours}.stem.bias")]
    if pre.patches_linear is not None:
        rules += _linear(f"{hk}/patches_linear", f"{ours}.patches_linear")
    pos = pre.position_encoding
    net_inputs = f"{hk}/~_build_network_inputs"
    if pos is not None and hasattr(pos, "proj"):  # ProjectedPositions
        rules += _linear(f"{net_inputs}/position_encoding_projector/linear", f"{ours}.position_encoding.proj")
        pos, ours = pos.base, f"{ours}.position_encoding.base"
    else:
        ours = f"{ours}.position_encoding"
    if pos is not None and hasattr(pos, "table"):  # TrainableGridPositions
        rules += _table(f"{net_inputs}/trainable_position_encoding", f"{ours}.table")
    return rules


def _image_classifier_table(model: nn.Module) -> list[KeyRule]:
    p = model.perceiver
    dec = "classification_decoder/~/basic_decoder"
    return (
        _image_preprocessor(p.input_preprocessor, "perceiver.input_preprocessor")
        + _encoder("perceiver_encoder", "perceiver.encoder", p.encoder)
        + _table(f"{dec}/~/trainable_position_encoding", "perceiver.decoder.decoder.queries.table")
        + _basic_decoder(dec, "perceiver.decoder.decoder")
    )


def _masked_lm_table(model: nn.Module) -> list[KeyRule]:
    p = model.perceiver
    return (
        [KeyRule("embed/embeddings", "perceiver.input_preprocessor.embeddings.weight")]
        + _table("trainable_position_encoding", "perceiver.input_preprocessor.position_embeddings")
        + _encoder("perceiver_encoder", "perceiver.encoder", p.encoder)
        + _table("basic_decoder/~/trainable_position_encoding", "perceiver.decoder.queries.table")
        + _basic_decoder("basic_decoder", "perceiver.decoder", with_output=False)
        + [KeyRule("embedding_decoder/bias", "embedding_decoder.bias")]
    )


def _optical_flow_table(model: nn.Module) -> list[KeyRule]:
    p = model.perceiver
    return (
        _image_preprocessor(p.input_preprocessor, "perceiver.input_preprocessor")
        + _encoder("perceiver_encoder", "perceiver.encoder", p.encoder)
        + _basic_decoder("flow_decoder/~/basic_decoder", "perceiver.decoder.decoder")
    )


# Haiku module names of the official multimodal model's per-modality pieces.
_MULTIMODAL_POSTPROCESSORS = {"audio": "audio_postprocessor", "image": "projection_postprocessor",
                              "label": "classification_postprocessor"}


def _multimodal_table(model: nn.Module) -> list[KeyRule]:
    p = model.perceiver
    pre, dec, post = "perceiver.input_preprocessor", "perceiver.decoder", "perceiver.output_postprocessor"
    rules: list[KeyRule] = []
    for m in p.input_preprocessor.modality_names:
        rules += _table(f"multimodal_preprocessor/{m}_padding", f"{pre}.padding.{m}")
        if p.input_preprocessor.mask_tokens is not None:
            rules += _table(f"multimodal_preprocessor/{m}_mask_token", f"{pre}.mask_tokens.{m}")
    rules += _encoder("encoder", "perceiver.encoder", p.encoder)
    for m in p.decoder.modalities:
        rules += _table(f"multimodal_decoder/~decoder_query/{m}_padding", f"{dec}.padding.{m}")
    rules += _basic_decoder("multimodal_decoder/~/basic_decoder", f"{dec}.decoder")
    rules += _table("classification_decoder/~/basic_decoder/~/trainable_position_encoding",
                    f"{dec}.queries.label.table")
    for m, hk in _MULTIMODAL_POSTPROCESSORS.items():
        rules += _linear(f"{hk}/linear", f"{post}.modalities.{m}.linear")
    return rules


def haiku_key_table(model: nn.Module) -> list[KeyRule]:
    """The key table for one of the task models of :mod:`perceivers.tasks` (sizes read from the model)."""
    from ..tasks import ImageClassifier, MaskedLanguageModel, MultimodalAutoencoder, OpticalFlowModel

    tables: list[tuple[type, Callable[[nn.Module], list[KeyRule]]]] = [
        (ImageClassifier, _image_classifier_table),
        (MaskedLanguageModel, _masked_lm_table),
        (OpticalFlowModel, _optical_flow_table),
        (MultimodalAutoencoder, _multimodal_table),
    ]
    for cls, table in tables:
        if isinstance(model, cls):
            return table(model)
    raise TypeError(
        f"no Haiku key table for {type(model).__name__}; expected one of "
        f"{', '.join(cls.__name__ for cls, _ in tables)} (build it with perceivers.create_model)"
    )


# --------------------------------------------------------------------------------------------------
# Strict conversion
# --------------------------------------------------------------------------------------------------

_OURS_ONLY_SUFFIXES = (".num_batches_tracked",)  # PyTorch bookkeeping without a Haiku counterpart


def _listing(title: str, items: Iterable[str], limit: int = 20) -> str:
    items = list(items)
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def fit_report(header: str, sections: Mapping[str, Iterable[str]]) -> str:
    """``header`` and one line per non-empty section (``title → keys``), for a checkpoint that does not fit."""
    return "\n  ".join([header, *(_listing(title, keys) for title, keys in sections.items() if keys)])


def haiku_to_state_dict(flat: Mapping[str, np.ndarray], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a flat Haiku checkpoint onto ``model``'s state dict, strictly.

    Raises:
        HaikuCheckpointError: naming every model tensor the checkpoint lacks, every checkpoint tensor
            the model has no place for, and every shape mismatch (after the listed transposes).
    """
    rules = haiku_key_table(model)
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    missing, misshaped, used = [], [], set()
    for rule in rules:
        if rule.haiku not in flat:
            if rule.ours is not None:
                missing.append(f"{rule.haiku} (→ {rule.ours})")
            continue
        used.add(rule.haiku)
        if rule.ours is None:
            continue
        if rule.ours not in target:  # a bug in a key table, not in the checkpoint
            raise KeyError(f"key table maps {rule.haiku!r} to {rule.ours!r}, which the model does not have")
        arr = TRANSFORMS[rule.transform](np.asarray(flat[rule.haiku]))
        want = target[rule.ours]
        if tuple(arr.shape) != tuple(want.shape):
            misshaped.append(f"{rule.haiku} {tuple(np.shape(flat[rule.haiku]))} → {rule.ours}: got "
                             f"{tuple(arr.shape)} after '{rule.transform}', model has {tuple(want.shape)}")
            continue
        out[rule.ours] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=want.dtype)
    unexpected = sorted(set(flat) - used)
    mapped = {r.ours for r in rules if r.ours is not None}
    unmapped = sorted(k for k in target if k not in mapped and not k.endswith(_OURS_ONLY_SUFFIXES))
    if missing or misshaped or unexpected or unmapped:
        raise HaikuCheckpointError(fit_report(f"Haiku checkpoint does not fit {type(model).__name__}", {
            "missing from the checkpoint": missing, "unexpected in the checkpoint": unexpected,
            "shape mismatches": misshaped, "model tensors without a Haiku source": unmapped}))
    for key, value in target.items():
        if key.endswith(_OURS_ONLY_SUFFIXES):
            out[key] = value.clone()
    return out


def load_haiku_checkpoint(
    model: nn.Module, source: str | os.PathLike | bytes | BinaryIO | Mapping[str, np.ndarray]
) -> nn.Module:
    """Load an official Haiku checkpoint (path, bytes, file object or flat mapping) into ``model`` in place.

    ``model`` is a task model from :func:`perceivers.create_model` whose sizes match the checkpoint.
    Returns ``model``.
    """
    flat = source if isinstance(source, Mapping) else read_haiku_checkpoint(source)
    try:
        state = haiku_to_state_dict(flat, model)
    except HaikuCheckpointError as e:
        if isinstance(source, (str, os.PathLike)):
            raise HaikuCheckpointError(f"{os.fspath(source)}: {e}") from e
        raise
    model.load_state_dict(state, strict=True)
    return model
