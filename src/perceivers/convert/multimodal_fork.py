"""perceiver-multi-modality-pytorch (the fork, 1.4.0) state dicts → :mod:`perceivers.models.multimodal`.

Covers ``MultiModalityPerceiver``, ``MultiModalityPerceiverNoPooling``, ``MultiModalityWithTextPerceiver`` and
``HierarchicalMultiModalityPerceiver`` (+ ``NoPooling``; one latent array per layer, ``latents.{i}``, never tied).
The fork stores a tied module once per use; perceivers stores each unique block once (``cross_blocks``,
``latent_blocks``) with the schedules :func:`~perceivers.models.common.tie_schedule` and
:func:`~perceivers.models.multimodal.latent_block_schedule`, so tied copies are checked to be identical and folded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ..models.common import tie_schedule
from ..models.multimodal import latent_block_schedule
from ._prenorm import TiedCopyMismatch, prenorm_attention, prenorm_feedforward, put
from .state_dict import strip_wrapper_prefixes

__all__ = ["from_multimodality_fork"]

_HEAD = {"to_logits.0": "head.norm", "to_logits.1": "head.proj"}


def _assemble(sd: Mapping[str, Tensor], depth: int, blocks: int, tied: bool) -> dict[str, Tensor]:
    cross_order = tie_schedule(depth, tied)
    latent_order = latent_block_schedule(depth, blocks, tied)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "latents" or key.startswith(("embeddings.", "latents.")):
            new = {key: value}
        elif (head := key.rpartition(".")[0]) in _HEAD:
            new = {f"{_HEAD[head]}.{key.rpartition('.')[2]}": value}
        elif m := re.fullmatch(r"layers\.(\d+)\.0\.(.+)", key):
            p = f"cross_blocks.{cross_order[int(m[1])]}"
            new = prenorm_attention(m[2], value, attn=f"{p}.attn", norms={"norm": f"{p}.norm_q",
                                                                          "norm_context": f"{p}.norm_kv"})
        elif m := re.fullmatch(r"layers\.(\d+)\.1\.(.+)", key):
            p = f"cross_blocks.{cross_order[int(m[1])]}"
            new = prenorm_feedforward(m[2], value, mlp=f"{p}.mlp", norm=f"{p}.norm_mlp")
        elif m := re.fullmatch(r"layers\.(\d+)\.2\.latent_blocks\.(\d+)\.([01])\.(.+)", key):
            p = f"latent_blocks.{latent_order[int(m[1])][int(m[2])]}"
            if m[3] == "0":
                new = prenorm_attention(m[4], value, attn=f"{p}.attn", norms={"norm": f"{p}.norm"})
            else:
                new = prenorm_feedforward(m[4], value, mlp=f"{p}.mlp", norm=f"{p}.norm_mlp")
        else:
            raise KeyError(key)
        for new_key, new_value in new.items():
            put(out, new_key, new_value, key)
    return out


def from_multimodality_fork(
    state_dict: Mapping[str, Tensor], *, weight_tie_layers: bool | None = None
) -> dict[str, Tensor]:
    """Convert a fork ``MultiModality*Perceiver`` state dict for the perceivers model with the same arguments.

    Args:
        state_dict: the fork model's ``state_dict()``.
        weight_tie_layers: how the fork model was built; ``None`` detects it (tied copies identical → tied).
            Pass ``False`` explicitly for an untied model whose layers happen to hold identical weights.
            Hierarchical models (``latents.{i}`` keys) are untied.

    Returns:
        a state dict that loads with ``strict=True``.

    Raises:
        KeyError: a key that the fork's layout does not have.
        ValueError: ``weight_tie_layers=True`` but copies that the fork shares differ.

    The state dict of a wrapped model (DistributedDataParallel's ``module.``, ``torch.compile``'s ``_orig_mod.``
    before every key) is unwrapped first.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    layer_keys = [re.match(r"layers\.(\d+)\.(?:2\.latent_blocks\.(\d+)\.)?", k) for k in state_dict]
    layer_keys = [m for m in layer_keys if m]
    hierarchical = "latents.0" in state_dict  # HierarchicalMultiModalityPerceiver: a latent array per layer
    if ("latents" not in state_dict and not hierarchical) or not layer_keys:
        raise ValueError("not a multi-modality fork state dict: expected 'latents' (or 'latents.0') and 'layers.*' keys")
    depth = 1 + max(int(m[1]) for m in layer_keys)
    blocks = 1 + max((int(m[2]) for m in layer_keys if m[2] is not None), default=0)
    if hierarchical:
        if weight_tie_layers:
            raise ValueError("a hierarchical fork model is never tied (its layers differ in width)")
        return _assemble(state_dict, depth, blocks, False)
    if weight_tie_layers is not None:
        return _assemble(state_dict, depth, blocks, weight_tie_layers)
    try:
        return _assemble(state_dict, depth, blocks, True)
    except TiedCopyMismatch:
        return _assemble(state_dict, depth, blocks, False)
