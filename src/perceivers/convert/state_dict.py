"""Reading, writing and strictly loading flat state dicts (safetensors or ``torch.save`` files).

Strict means: every tensor of the model is given (or an alias of it, for tied weights), no tensor is
left over, every shape matches; otherwise :class:`CheckpointError` names the offending tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "check_state_dict",
    "is_safetensors",
    "load_state_dict_strict",
    "read_state_dict",
    "save_state_dict",
    "tied_groups",
]

_ALIASES_KEY = "perceivers.aliases"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors (all named)."""


def tied_groups(model: nn.Module) -> dict[str, str]:
    """``{name: first_name}`` for state-dict entries that are the same tensor as an earlier entry."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first:
            alias[name] = first[key]
        else:
            first[key] = name
    return alias


def _short(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``state`` covers ``model`` exactly (tied copies may be absent)."""
    own = model.state_dict()
    aliases = tied_groups(model)
    present = set(state)
    missing = []
    for name in own:
        if name in present:
            continue
        root = aliases.get(name, name)
        group = [root, *(n for n, r in aliases.items() if r == root)]
        if not any(n in present for n in group):
            missing.append(name)
    unexpected = sorted(present - set(own))
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
    if mismatched:
        problems.append(f"mis-shaped {len(mismatched)}: {_short(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint") -> nn.Module:
    """Check ``state`` (:func:`check_state_dict`), fill in tied copies, ``load_state_dict(strict=True)``."""
    check_state_dict(model, state, source=source)
    full = dict(state)
    groups: dict[str, list[str]] = {}
    for name, root in tied_groups(model).items():
        groups.setdefault(root, [root]).append(name)
    for members in groups.values():
        value = next(full[n] for n in members if n in full)
        for n in members:
            full.setdefault(n, value)
    model.load_state_dict(full, strict=True)
    return model


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike[str], *,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` as safetensors; tensors that are the same view are stored once (aliases in metadata)."""
    from safetensors.torch import save_file

    seen_views: dict[tuple, str] = {}
    seen_storage: set[int] = set()
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() and view in seen_views:
            aliases[name] = seen_views[view]
            continue
        seen_views[view] = name
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage or not t.is_contiguous():
            t = t.contiguous().clone()  # shares memory with another tensor: store a copy
        seen_storage.add(ptr)
        tensors[name] = t.cpu()
    meta = {"format": "pt", **dict(metadata or {})}
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    save_file(tensors, os.fspath(path), metadata=meta)


def read_state_dict(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A ``.safetensors`` file (aliases restored) or a ``torch.save`` file, loaded with ``weights_only=True``.

    A ``torch.save`` file holding ``{"state_dict": …}`` or ``{"model": …}`` (training checkpoints) is
    unwrapped.
    """
    path = Path(path)
    if is_safetensors(path):
        from safetensors import safe_open

        state: dict[str, Tensor] = {}
        with safe_open(os.fspath(path), framework="pt", device=str(map_location)) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                state[key] = f.get_tensor(key)
            meta = f.metadata() or {}
        for name, root in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
            state[name] = state[root]
        return state
    obj = torch.load(path, map_location=map_location, weights_only=True)
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return dict(obj)


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header size, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size < 100_000_000 and head[8:9] == b"{"
