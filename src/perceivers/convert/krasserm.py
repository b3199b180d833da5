"""krasserm's perceiver-io (0.6.0) Perceiver AR state dicts → perceivers :class:`~perceivers.models.perceiver_ar.PerceiverAR`.

The key table below renames every tensor of ``perceiver.model.text.clm.CausalLanguageModel``; a tensor
that no rule names is refused. krasserm stores the rotary frequencies (``frq_pos_encoding.inv_freq``);
ours are a constant of the module, so they are checked against the model's and then dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .state_dict import CheckpointError, load_state_dict_strict

__all__ = ["from_krasserm_perceiver_ar", "load_krasserm_perceiver_ar"]

_ATTENTION = r"(?:attention\.(?P<proj>[qkvo])_proj)"
_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out"}
_MLP = {"0": "norm_mlp", "1": "mlp.fc1", "3": "mlp.fc2"}  # LayerNorm, Linear, GELU, Linear

# (krasserm pattern, ours); named groups: i = self-attention layer, proj = q/k/v/o, mlp = MLP index
_RULES: list[tuple[str, str]] = [
    (r"input_adapter\.txt_embedding\.weight", "input_adapter.token_embedding.weight"),
    (r"input_adapter\.pos_encoding", "input_adapter.pos_embedding"),
    (r"output_layer\.(?P<param>weight|bias)", "output_layer.{param}"),
    (r"cross_attention\.0\.module\.q_norm\.(?P<param>weight|bias)", "cross_attention.norm_q.{param}"),
    (r"cross_attention\.0\.module\.kv_norm\.(?P<param>weight|bias)", "cross_attention.norm_kv.{param}"),
    (rf"cross_attention\.0\.module\.{_ATTENTION}\.(?P<param>weight|bias)", "cross_attention.attn.{proj}.{param}"),
    (r"cross_attention\.1\.module\.(?P<mlp>[013])\.(?P<param>weight|bias)", "cross_attention.{mlp}.{param}"),
    (r"self_attention\.(?P<i>\d+)\.0\.module\.norm\.(?P<param>weight|bias)", "self_attention.{i}.norm.{param}"),
    (rf"self_attention\.(?P<i>\d+)\.0\.module\.{_ATTENTION}\.(?P<param>weight|bias)",
     "self_attention.{i}.attn.{proj}.{param}"),
    (r"self_attention\.(?P<i>\d+)\.1\.module\.(?P<mlp>[013])\.(?P<param>weight|bias)", "self_attention.{i}.{mlp}.{param}"),
]
_INV_FREQ = "input_adapter.frq_pos_encoding.inv_freq"


def _rename(key: str) -> str | None:
    for pattern, target in _RULES:
        m = re.fullmatch(pattern, key)
        if m:
            groups = m.groupdict()
            if "proj" in groups:
                groups["proj"] = _PROJ[groups["proj"]]
            if "mlp" in groups:
                groups["mlp"] = _MLP[groups["mlp"]]
            return target.format(**groups)
    return None


def from_krasserm_perceiver_ar(state: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Rename krasserm's ``PerceiverAR``/``CausalLanguageModel`` tensors to ours (strict).

    Raises :class:`CheckpointError` naming the tensors no rule covers, and (with ``model``) when the
    stored rotary frequencies differ from the model's.
    """
    out: dict[str, Tensor] = {}
    unmatched = []
    for key, value in state.items():
        if key == _INV_FREQ:
            continue
        new = _rename(key)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    if unmatched:
        raise CheckpointError(f"krasserm Perceiver AR state dict does not fit: {len(unmatched)} tensors have no "
                              "rule in the key table: " + ", ".join(unmatched[:12]))
    if _INV_FREQ not in state:
        raise CheckpointError(f"krasserm Perceiver AR state dict does not fit: missing {_INV_FREQ}")
    if model is not None:
        ours = model.rotary.inv_freq
        theirs = state[_INV_FREQ]
        if theirs.shape != ours.shape or not torch.allclose(theirs.to(ours), ours, rtol=1e-6, atol=0):
            raise CheckpointError(f"krasserm Perceiver AR state dict does not fit: {_INV_FREQ} "
                                  f"{tuple(theirs.shape)} differs from the model's rotary frequencies {tuple(ours.shape)}")
    return out


def load_krasserm_perceiver_ar(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Convert ``state`` (krasserm's keys) and load it strictly into ``model`` (every tensor used, shapes equal)."""
    return load_state_dict_strict(model, from_krasserm_perceiver_ar(state, model), source="krasserm Perceiver AR state dict")
