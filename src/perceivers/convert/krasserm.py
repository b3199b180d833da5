"""krasserm's perceiver-io (0.6.0) Perceiver AR state dicts → perceivers :class:`~perceivers.models.perceiver_ar.PerceiverAR`.

The key table below renames every tensor of ``perceiver.model.text.clm.CausalLanguageModel``; a tensor
that no rule names is refused. krasserm stores the rotary frequencies (``frq_pos_encoding.inv_freq``);
ours are a constant of the module, so they are checked against the model's and then dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .state_dict import CheckpointError, Rule, load_state_dict_strict, rename_by_rules

__all__ = ["from_krasserm_perceiver_ar", "load_krasserm_perceiver_ar"]

_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out"}
_MLP = {"0": "norm_mlp", "1": "mlp.fc1", "3": "mlp.fc2"}  # LayerNorm, Linear, GELU, Linear


def _layer(theirs: str, ours: str, norms: dict[str, str]) -> list[Rule]:
    """An attention layer (``<theirs>.0.module``) and its MLP (``<theirs>.1.module``) → ``<ours>.…``."""
    return [
        *[(f"{theirs}.0.module.{n}.{{p}}", f"{ours}.{o}.{{p}}") for n, o in norms.items()],
        *[(f"{theirs}.0.module.attention.{k}_proj.{{p}}", f"{ours}.attn.{o}.{{p}}") for k, o in _PROJ.items()],
        *[(f"{theirs}.1.module.{i}.{{p}}", f"{ours}.{o}.{{p}}") for i, o in _MLP.items()],
    ]


#: krasserm's names → ours (``{i}`` a self-attention layer, ``{p}`` weight or bias)
_RULES: list[Rule] = [
    ("input_adapter.txt_embedding.weight", "input_adapter.token_embedding.weight"),
    ("input_adapter.pos_encoding", "input_adapter.pos_embedding"),
    ("output_layer.{p}", "output_layer.{p}"),
    *_layer("cross_attention", "cross_attention", {"q_norm": "norm_q", "kv_norm": "norm_kv"}),
    *_layer("self_attention.{i}", "self_attention.{i}", {"norm": "norm"}),
]
_INV_FREQ = "input_adapter.frq_pos_encoding.inv_freq"


def from_krasserm_perceiver_ar(state: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Rename krasserm's ``PerceiverAR``/``CausalLanguageModel`` tensors to ours (strict).

    Raises :class:`CheckpointError` naming the tensors no rule covers, and (with ``model``) when the
    stored rotary frequencies differ from the model's.
    """
    out = rename_by_rules({k: v for k, v in state.items() if k != _INV_FREQ}, _RULES, what="Perceiver AR",
                          source="krasserm")
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
