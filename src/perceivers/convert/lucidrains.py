"""perceiver-pytorch (lucidrains) state dicts → perceivers state dicts.

Every key layout is read: 0.8–0.10 (``layers.{i}.{0,1,2}``, ``cross_attend_blocks``), 0.11
(``layers.{i}.cross_attn`` / ``cross_ff`` / ``self_attns``, ``cross_attend_block``), and the early flat
``Perceiver`` layout (``layers.{i}.{0,1,2,3}`` = cross-attention, its feed-forward, one self-attention, its
feed-forward; ``to_logits.{0,1}``) that the multi-modality fork's ``Perceiver`` keeps. The fused
``to_kv`` projection is split into ``to_k`` / ``to_v``. perceiver-pytorch stores a tied layer once per
use; perceivers stores each unique block once and a ``block_order`` schedule, so tied copies are
checked to be identical and folded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ._prenorm import prenorm_attention, prenorm_feedforward
from .state_dict import strip_wrapper_prefixes

__all__ = ["detect_family", "from_lucidrains"]

def _attention(prefix: str, rest: str, value: Tensor, out: dict[str, Tensor], norm_names: dict[str, str]) -> None:
    """Map ``rest`` inside a PreNorm(Attention) to ``prefix.attn`` and ``prefix.<norm>`` of a perceivers block."""
    norms = {name: f"{prefix}.{ours}" for name, ours in norm_names.items()}
    out.update(prenorm_attention(rest, value, attn=f"{prefix}.attn", norms=norms))


def _ff(prefix: str, rest: str, value: Tensor, out: dict[str, Tensor], norm_name: str) -> None:
    out.update(prenorm_feedforward(rest, value, mlp=f"{prefix}.mlp", norm=f"{prefix}.{norm_name}"))


def _residual(prefix: str, rest: str, value: Tensor, out: dict[str, Tensor]) -> None:
    table = {"to_attn_logits.0": "norm", "to_attn_logits.1": "down", "to_attn_logits.2": "up"}
    name, _, param = rest.rpartition(".")
    out[f"{prefix}.{table[name]}.{param}"] = value


_CROSS_NORMS = {"norm": "norm_q", "norm_context": "norm_kv"}
_SELF_NORMS = {"norm": "norm"}


def detect_family(state_dict: Mapping[str, Tensor]) -> str:
    """``"Perceiver"``, ``"PerceiverIO"``, ``"PerceiverLM"`` or ``"PerceiverBlock"`` from the keys of a
    perceiver-pytorch state dict (after the prefixes of wrappers such as ``module.`` are removed)."""
    keys = set(strip_wrapper_prefixes(state_dict))
    if keys and all(k.startswith(("cross_attn.", "cross_ff.", "self_attns.")) for k in keys):
        return "PerceiverBlock"
    if any(k.startswith("perceiver_io.") for k in keys):
        return "PerceiverLM"
    if any(k.startswith(("cross_attend_block.", "cross_attend_blocks.")) for k in keys):
        return "PerceiverIO"
    if any(k.startswith("layers.") for k in keys) and "latents" in keys:
        return "Perceiver"
    sample = ", ".join(repr(k) for k in sorted(keys)[:3])
    raise ValueError("not a perceiver-pytorch state dict: expected 'latents' and 'layers.*' keys (Perceiver, "
                     "PerceiverIO, PerceiverLM) or only 'cross_attn.*', 'cross_ff.*', 'self_attns.*' "
                     f"(PerceiverBlock), got {len(keys)} keys such as {sample or 'none'}")


def _layer_schedule(groups: dict[int, dict[str, Tensor]], tie_first: bool, fold: bool = True) -> list[int]:
    """Fold identical layers (a tied model saved by perceiver-pytorch) into one unique block index each.

    ``fold=False`` keeps every layer its own block (an untied model whose layers happen to be equal).
    """
    if not fold:
        return list(range(len(groups)))
    order: list[int] = []
    uniques: list[dict[str, Tensor]] = []
    for i in sorted(groups):
        params = groups[i]
        match = None
        # perceiver-pytorch ties layers 1..depth-1 of Perceiver (layer 0 apart) and all layers of PerceiverIO.
        candidates = range(len(uniques)) if tie_first else range(1, len(uniques))
        for u in candidates:
            ref = uniques[u]
            if ref.keys() == params.keys() and all(
                ref[k].shape == params[k].shape and (ref[k].data_ptr() == params[k].data_ptr() or bool((ref[k] == params[k]).all()))
                for k in ref
            ):
                match = u
                break
        if match is None:
            uniques.append(params)
            match = len(uniques) - 1
        order.append(match)
    return order


def _convert_perceiver(sd: Mapping[str, Tensor], out: dict[str, Tensor], fold: bool = True) -> list[int]:
    layers: dict[int, dict[str, Tensor]] = {}
    # the head: Reduce (no weights), LayerNorm, Linear; the early layout has no Reduce module
    head = {"0": "norm", "1": "proj"} if "to_logits.2.weight" not in sd else {"1": "norm", "2": "proj"}
    for key, value in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key == "latents":
            out["latents"] = value
        elif key.startswith("to_logits."):
            idx, param = key.split(".")[1:]
            out[f"head.{head[idx]}.{param}"] = value
        elif key.startswith("attn_residuals."):
            continue  # handled with the layer schedule below
        else:
            raise KeyError(key)
    order = _layer_schedule(layers, tie_first=False, fold=fold)
    done: set[int] = set()
    for i, unique in zip(sorted(layers), order):
        if unique in done:
            continue
        done.add(unique)
        p = f"blocks.{unique}"
        for rest, value in layers[i].items():
            try:
                _perceiver_layer(p, rest, value, out)
            except KeyError as err:
                raise KeyError(f"layers.{i}.{rest}") from err
        for key, value in sd.items():
            m = re.fullmatch(rf"attn_residuals\.{i}\.(.+)", key)
            if m:
                _residual(f"attn_residuals.{unique}", m.group(1), value, out)
    return order


def _perceiver_layer(p: str, rest: str, value: Tensor, out: dict[str, Tensor]) -> None:
    patterns = [
        # 0.11 layout
        (r"cross_attn\.(.+)", lambda m: _attention(f"{p}.cross_attn", m[1], value, out, _CROSS_NORMS)),
        (r"cross_ff\.(.+)", lambda m: _ff(f"{p}.cross_attn", m[1], value, out, "norm_mlp")),
        (r"self_attns\.(\d+)\.0\.(.+)", lambda m: _attention(f"{p}.self_attns.{m[1]}", m[2], value, out, _SELF_NORMS)),
        (r"self_attns\.(\d+)\.1\.(.+)", lambda m: _ff(f"{p}.self_attns.{m[1]}", m[2], value, out, "norm_mlp")),
        # 0.8–0.10 layout
        (r"0\.(.+)", lambda m: _attention(f"{p}.cross_attn", m[1], value, out, _CROSS_NORMS)),
        (r"1\.(.+)", lambda m: _ff(f"{p}.cross_attn", m[1], value, out, "norm_mlp")),
        (r"2\.(\d+)\.0\.(.+)", lambda m: _attention(f"{p}.self_attns.{m[1]}", m[2], value, out, _SELF_NORMS)),
        (r"2\.(\d+)\.1\.(.+)", lambda m: _ff(f"{p}.self_attns.{m[1]}", m[2], value, out, "norm_mlp")),
        # early flat layout (the multi-modality fork's Perceiver): one self-attention and its feed-forward
        (r"2\.((?:fn|norm)\..+)", lambda m: _attention(f"{p}.self_attns.0", m[1], value, out, _SELF_NORMS)),
        (r"3\.((?:fn|norm)\..+)", lambda m: _ff(f"{p}.self_attns.0", m[1], value, out, "norm_mlp")),
    ]
    for pattern, apply in patterns:
        m = re.fullmatch(pattern, rest)
        if m:
            apply(m)
            return
    if re.fullmatch(r"3\.(.+)", rest):  # 0.10 attention residual stored inside the layer
        _residual(p.replace("blocks", "attn_residuals"), rest[2:], value, out)
        return
    raise KeyError(rest)


def _convert_io(sd: Mapping[str, Tensor], out: dict[str, Tensor], prefix: str = "", fold: bool = True) -> list[int]:
    layers: dict[int, dict[str, Tensor]] = {}
    residuals: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if m := re.fullmatch(r"layers\.(\d+)\.(.+)", k):
            layers.setdefault(int(m[1]), {})[m[2]] = value
        elif m := re.fullmatch(r"attn_residuals\.(\d+)\.(.+)", k):
            residuals.setdefault(int(m[1]), {})[m[2]] = value
        elif k == "latents":
            out[f"{prefix}latents"] = value
        elif m := re.fullmatch(r"cross_attend_block\.cross_attn\.(.+)|cross_attend_blocks\.0\.(.+)", k):
            _attention(f"{prefix}encoder_cross_attn", m[1] or m[2], value, out, _CROSS_NORMS)
        elif m := re.fullmatch(r"cross_attend_block\.cross_ff\.(.+)|cross_attend_blocks\.1\.(.+)", k):
            _ff(f"{prefix}encoder_cross_attn", m[1] or m[2], value, out, "norm_mlp")
        elif m := re.fullmatch(r"decoder_cross_attn\.(.+)", k):
            _attention(f"{prefix}decoder_cross_attn", m[1], value, out, _CROSS_NORMS)
        elif m := re.fullmatch(r"decoder_ff\.(.+)", k):
            _ff(f"{prefix}decoder_cross_attn", m[1], value, out, "norm_mlp")
        elif k.startswith("to_logits."):
            out[f"{prefix}{k}"] = value
        else:
            raise KeyError(key)
    order = _layer_schedule(layers, tie_first=True, fold=fold)
    done: set[int] = set()
    for i, unique in zip(sorted(layers), order):
        if unique in done:
            continue
        done.add(unique)
        p = f"{prefix}blocks.{unique}"
        for rest, value in layers[i].items():
            if m := re.fullmatch(r"(?:self_attns\.0\.)?0\.(.+)", rest):
                _attention(p, m[1], value, out, _SELF_NORMS)
            elif m := re.fullmatch(r"(?:self_attns\.0\.)?1\.(.+)", rest):
                _ff(p, m[1], value, out, "norm_mlp")
            elif m := re.fullmatch(r"2\.(.+)", rest):  # 0.10 attention residual
                _residual(f"{prefix}attn_residuals.{unique}", m[1], value, out)
            else:
                raise KeyError(f"{prefix}layers.{i}.{rest}")
        for rest, value in residuals.get(i, {}).items():
            _residual(f"{prefix}attn_residuals.{unique}", rest, value, out)
    return order


def from_lucidrains(state_dict: Mapping[str, Tensor], *, weight_tie_layers: bool | None = None) -> dict[str, Tensor]:
    """Convert a ``perceiver_pytorch`` ``Perceiver`` / ``PerceiverIO`` / ``PerceiverLM`` / ``PerceiverBlock``
    state dict.

    The result loads with ``strict=True`` into the perceivers model built with the same arguments.
    Works for both key layouts (0.8–0.10 and 0.11), and for a model saved inside
    ``DistributedDataParallel`` / ``DataParallel`` or ``torch.compile`` (keys prefixed ``module.`` /
    ``_orig_mod.``, removed). Tied layers are detected (shared storage or
    identical values) and stored once; ``weight_tie_layers=False`` keeps every layer apart, for an
    untied model whose layers hold equal values (e.g. initialised from a tied one).

    Raises:
        KeyError: a key that belongs to no known perceiver-pytorch layout.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    family = detect_family(state_dict)
    fold = weight_tie_layers is not False
    out: dict[str, Tensor] = {}
    if family == "PerceiverBlock":
        for key, value in state_dict.items():
            _perceiver_layer("block", key, value, out)
        return {k.removeprefix("block."): v for k, v in out.items()}
    if family == "PerceiverLM":
        for key in ("token_emb.weight", "pos_emb.weight"):
            out[key] = state_dict[key]
        _convert_io({k: v for k, v in state_dict.items() if k.startswith("perceiver_io.")}, out, "perceiver_io.",
                    fold=fold)
        extra = set(state_dict) - {k for k in state_dict if k.startswith("perceiver_io.")} - {"token_emb.weight", "pos_emb.weight"}
        if extra:
            raise KeyError(f"unexpected keys for PerceiverLM: {sorted(extra)}")
    elif family == "PerceiverIO":
        _convert_io(state_dict, out, fold=fold)
    else:
        _convert_perceiver(state_dict, out, fold=fold)
    return out
