"""perceiver-pytorch's variant Perceivers (``experimental``, ``gated``, ``mixed_latents``; 0.8–0.11) → perceivers.

Targets :class:`~perceivers.models.experimental.BottomUpPerceiver`,
:class:`~perceivers.models.variants.GatedPerceiver` and :class:`~perceivers.models.variants.MixedLatentsPerceiver`.
Tied layers (layers ``1..depth-1`` share one module) are folded into one block after checking the copies are
identical. Fused projections are split (``to_kv`` → k, v; ``to_qkv`` → q, k, v) and the mixer's kernel-size-1
``Conv1d`` weights ``[out, in, 1]`` become ``Linear`` weights ``[out, in]``.

The experimental model's last layer owns token-update sublayers it never runs (indices 2–4); their keys are dropped,
and only those: every other key is used, and an unknown key raises ``KeyError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Literal

from torch import Tensor

from ..models.common import tie_schedule
from ._prenorm import TiedCopyMismatch, prenorm_attention, prenorm_feedforward, put
from .state_dict import strip_wrapper_prefixes

__all__ = ["detect_variant", "from_lucidrains_variant"]

Variant = Literal["experimental", "gated", "mixed_latents"]
_HEAD = {"to_logits.0": "head.norm", "to_logits.1": "head.proj"}


def detect_variant(state_dict: Mapping[str, Tensor]) -> Variant:
    """``"experimental"`` (has ``data_proj``), ``"gated"`` (GRU gates) or ``"mixed_latents"`` (Conv1d mixer)."""
    keys = set(strip_wrapper_prefixes(state_dict))
    if "latents" not in keys or not any(k.startswith("layers.") for k in keys):
        raise ValueError("not a perceiver-pytorch state dict: expected 'latents' and 'layers.*' keys")
    if "data_proj.weight" in keys:
        return "experimental"
    if any(".gru." in k for k in keys):
        return "gated"
    if any(re.fullmatch(r"layers\.\d+\.2\.fn\.0\.weight", k) for k in keys):
        return "mixed_latents"
    raise ValueError("not a perceiver-pytorch experimental / gated / mixed_latents state dict")


def _cross(p: str) -> dict[str, str]:
    return {"norm": f"{p}.norm_q", "norm_context": f"{p}.norm_kv"}


def _experimental(i: int, sub: str, rest: str, value: Tensor, p: str) -> dict[str, Tensor]:
    if sub == "0":
        return prenorm_attention(rest, value, attn=f"{p}.cross_attn.attn", norms=_cross(f"{p}.cross_attn"))
    if sub == "1":
        return prenorm_feedforward(rest, value, mlp=f"{p}.cross_attn.mlp", norm=f"{p}.cross_attn.norm_mlp")
    if sub == "2":
        return prenorm_attention(rest, value, attn=f"{p}.rev_cross_attn.attn", norms=_cross(f"{p}.rev_cross_attn"))
    if sub == "3":
        return prenorm_feedforward(rest, value, mlp=f"{p}.rev_cross_attn.mlp", norm=f"{p}.rev_cross_attn.norm_mlp")
    if sub == "4":
        name, _, param = rest.rpartition(".")
        if name == "norm":
            return {f"{p}.norm_input.{param}": value}
        if name == "fn.to_qkv":
            q, k, v = value.chunk(3, dim=0)
            return {f"{p}.input_attn.to_{n}.{param}": t.clone() for n, t in zip("qkv", (q, k, v))}
        if name == "fn.to_out.0":
            return {f"{p}.input_attn.to_out.{param}": value}
        raise KeyError(rest)
    if sub == "5":
        return prenorm_attention(rest, value, attn=f"{p}.latent_attn.attn", norms={"norm": f"{p}.latent_attn.norm"})
    if sub == "6":
        return prenorm_feedforward(rest, value, mlp=f"{p}.latent_attn.mlp", norm=f"{p}.latent_attn.norm_mlp")
    raise KeyError(rest)


def _gated(i: int, sub: str, rest: str, value: Tensor, p: str) -> dict[str, Tensor]:
    if sub in ("0", "2") and rest.startswith("gru."):
        return {f"{p}.{'cross_gate' if sub == '0' else 'self_gate'}.{rest[4:]}": value}
    if not rest.startswith("fn."):
        raise KeyError(rest)
    rest = rest[3:]  # GRUGating / Residual wrap the PreNorm in `.fn`
    if sub == "0":
        return prenorm_attention(rest, value, attn=f"{p}.cross_attn.attn", norms=_cross(f"{p}.cross_attn"))
    if sub == "1":
        return prenorm_feedforward(rest, value, mlp=f"{p}.cross_mlp", norm=f"{p}.norm_cross_mlp")
    if sub == "2":
        return prenorm_attention(rest, value, attn=f"{p}.self_attn", norms={"norm": f"{p}.norm_self"})
    if sub == "3":
        return prenorm_feedforward(rest, value, mlp=f"{p}.self_mlp", norm=f"{p}.norm_self_mlp")
    raise KeyError(rest)


def _mixed_latents(i: int, sub: str, rest: str, value: Tensor, p: str) -> dict[str, Tensor]:
    if sub == "0":
        return prenorm_attention(rest, value, attn=f"{p}.cross_attn.attn", norms=_cross(f"{p}.cross_attn"))
    if sub == "1":
        return prenorm_feedforward(rest, value, mlp=f"{p}.cross_attn.mlp", norm=f"{p}.cross_attn.norm_mlp")
    if sub == "2":
        name, _, param = rest.rpartition(".")
        if name == "norm":
            return {f"{p}.norm_mix.{param}": value}
        fc = {"fn.0": "fc1", "fn.3": "fc2"}.get(name)
        if fc is None:
            raise KeyError(rest)
        return {f"{p}.mixer.{fc}.{param}": value.squeeze(-1) if param == "weight" else value}
    if sub == "3":
        return prenorm_feedforward(rest, value, mlp=f"{p}.mlp", norm=f"{p}.norm_mlp")
    raise KeyError(rest)


_LAYER: dict[str, Callable[[int, str, str, Tensor, str], dict[str, Tensor]]] = {
    "experimental": _experimental,
    "gated": _gated,
    "mixed_latents": _mixed_latents,
}


def _assemble(sd: Mapping[str, Tensor], variant: Variant, depth: int, tied: bool) -> dict[str, Tensor]:
    order = tie_schedule(depth, tied)
    # experimental: a unique block gets token-update sublayers only if a layer before the last uses it
    updating = {u for step, u in enumerate(order) if step < depth - 1}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "latents" or (variant == "experimental" and key.startswith("data_proj.")):
            new = {key: value}
        elif (head := key.rpartition(".")[0]) in _HEAD:
            new = {f"{_HEAD[head]}.{key.rpartition('.')[2]}": value}
        elif m := re.fullmatch(r"layers\.(\d+)\.(\d+)\.(.+)", key):
            i, sub, rest = int(m[1]), m[2], m[3]
            if variant == "experimental" and sub in ("2", "3", "4") and order[i] not in updating:
                continue  # token-update sublayers of the last layer: never run, dropped
            try:
                new = _LAYER[variant](i, sub, rest, value, f"blocks.{order[i]}")
            except KeyError as err:
                raise KeyError(key) from err
        else:
            raise KeyError(key)
        for new_key, new_value in new.items():
            put(out, new_key, new_value, key)
    return out


def from_lucidrains_variant(
    state_dict: Mapping[str, Tensor], variant: Variant | None = None, *, weight_tie_layers: bool | None = None
) -> dict[str, Tensor]:
    """Convert a ``perceiver_pytorch.{experimental,gated,mixed_latents}.Perceiver`` state dict.

    Args:
        variant: which model; ``None`` detects it from the keys (:func:`detect_variant`).
        weight_tie_layers: how the model was built; ``None`` detects it (layers ``1..`` identical → tied).

    Returns:
        a state dict that loads with ``strict=True`` into the perceivers model built with the same arguments.

    Raises:
        KeyError: a key outside the variant's layout. ValueError: tied copies that differ.

    The state dict of a wrapped model (DistributedDataParallel's ``module.``, ``torch.compile``'s ``_orig_mod.``
    before every key) is unwrapped first.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    variant = detect_variant(state_dict) if variant is None else variant
    if variant not in _LAYER:
        raise ValueError(f"variant must be one of {sorted(_LAYER)}, got {variant!r}")
    layers = [int(m[1]) for k in state_dict if (m := re.match(r"layers\.(\d+)\.", k))]
    if not layers:
        raise ValueError("state dict has no 'layers.*' keys")
    depth = max(layers) + 1
    if weight_tie_layers is not None:
        return _assemble(state_dict, variant, depth, weight_tie_layers)
    try:
        return _assemble(state_dict, variant, depth, True)
    except TiedCopyMismatch:
        return _assemble(state_dict, variant, depth, False)
