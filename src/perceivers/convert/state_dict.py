"""Reading, writing and strictly loading flat state dicts (safetensors or ``torch.save`` files).

Strict means: every tensor of the model is given (or an alias of it, for tied weights), no tensor is
left over, every shape matches; otherwise :class:`CheckpointError` names the offending tensors.

Files are written atomically (a crash or full disk mid-write keeps the previous file) with a SHA-256
of the tensors in the safetensors metadata; reading verifies it when present, and a truncated,
corrupt or code-carrying file raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..safe_files import atomic_path, tensor_digest

__all__ = [
    "CheckpointError",
    "Rule",
    "adopt_checkpoint_dtype",
    "check_state_dict",
    "is_safetensors",
    "load_state_dict_strict",
    "read_state_dict",
    "read_torch_file",
    "rename_by_rules",
    "rename_key",
    "save_state_dict",
    "strip_wrapper_prefixes",
    "tied_groups",
]

_ALIASES_KEY = "perceivers.aliases"
_DIGEST_KEY = "perceivers.sha256"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensors (all named)."""


#: ``(source template, target template)``: ``{i}`` a layer index, ``{m}`` a modality name, ``{p}`` a parameter
#: or buffer name (``weight``, ``bias``, BatchNorm statistics); the rest is literal.
Rule = tuple[str, str]

_FIELDS = {"i": r"\d+", "m": r"[A-Za-z_]+", "p": r"weight|bias|running_mean|running_var|num_batches_tracked"}


@cache
def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[a-z]\})", template)
    regex = "".join(f"(?P<{p[1]}>{_FIELDS[p[1]]})" if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


def rename_key(key: str, rules: list[Rule], *, reverse: bool = False) -> str | None:
    """``key`` renamed by the one rule that matches it (target → source with ``reverse``); ``None`` if none does."""
    hits = []
    for a, b in rules:
        src, dst = (b, a) if reverse else (a, b)
        match = _pattern(src).match(key)
        if match:
            hits.append(dst.format(**match.groupdict()))
    if len(hits) > 1:
        raise RuntimeError(f"key table is ambiguous for {key!r}: {hits}")
    return hits[0] if hits else None


def rename_by_rules(
    state: Mapping[str, Tensor],
    rules: list[Rule],
    *,
    what: str,
    source: str,
    reverse: bool = False,
    transform: Callable[[str, str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Rename every tensor of ``state`` by ``rules``; a tensor no rule names is a :class:`CheckpointError`
    naming the ``source`` side and the ``what`` table. ``transform(old, new, value)`` may change a value."""
    out: dict[str, Tensor] = {}
    unmatched = []
    for key, value in state.items():
        new = rename_key(key, rules, reverse=reverse)
        if new is None:
            unmatched.append(key)
            continue
        out[new] = value if transform is None else transform(key, new, value)
    if unmatched:
        raise CheckpointError(f"{len(unmatched)} {source} tensors have no rule in the {what} key table: "
                              + ", ".join(unmatched[:12]))
    return out


#: prefixes that wrappers put before every key: DistributedDataParallel / DataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The state dict of the model inside wrappers (``module.``, ``_orig_mod.``, nested) that prefix every key."""
    while state:
        prefix = next((w for w in WRAPPER_PREFIXES if all(k.startswith(w) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


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
        given = [n for n in members if n in full]
        value = full[given[0]]
        differing = [n for n in given[1:] if not torch.equal(full[n], value)]
        if differing:
            raise CheckpointError(f"{source}: {' and '.join([given[0], *differing])} are one tensor in "
                                  f"{type(model).__name__} but differ in the checkpoint (a checkpoint of an untied "
                                  "model?); loading would keep one copy and drop the others")
        for n in members:
            full.setdefault(n, value)
    model.load_state_dict(full, strict=True)
    return model


def adopt_checkpoint_dtype(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Give a freshly built ``model`` the floating dtypes of the checkpoint ``state`` (our names), in place.

    ``from_pretrained`` builds the model a checkpoint describes, its dtype included (as transformers'
    ``dtype="auto"``): a checkpoint in one dtype converts the whole model (``model.to``, as the model that was
    saved had been converted); one of mixed dtypes sets each stored tensor's own. ``load_checkpoint`` into an
    existing model keeps that model's dtypes instead (``load_state_dict`` casts).
    """
    stored = {v.dtype for v in state.values() if v.is_floating_point()}
    own = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if not stored or stored == own:
        return model
    if len(stored) == 1 and len(own) == 1:
        return model.to(next(iter(stored)))
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            value = state.get(name)
            if value is not None and tensor.is_floating_point() and value.is_floating_point() and value.dtype != tensor.dtype:
                tensor.data = tensor.data.to(value.dtype)
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
    meta[_DIGEST_KEY] = tensor_digest(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, os.fspath(tmp), metadata=meta)


def read_state_dict(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu",
                    extras: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """A ``.safetensors`` file (aliases restored) or a ``torch.save`` file, loaded with ``weights_only=True``.

    A ``torch.save`` file holding ``{"state_dict": …}`` or ``{"model": …}`` (training checkpoints) is
    unwrapped; the checkpoint's other entries (e.g. Lightning's ``hyper_parameters``) go into ``extras``.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {path}: the file is empty (0 bytes)")
    if is_safetensors(path):
        from safetensors import safe_open

        state: dict[str, Tensor] = {}
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    state[key] = f.get_tensor(key)
                meta = f.metadata() or {}
            aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
        except Exception as e:  # safetensors' own errors: truncated file, broken header
            raise CheckpointError(f"cannot read {path}: truncated or corrupt safetensors file ({e})") from e
        digest = meta.get(_DIGEST_KEY)
        if digest is not None and tensor_digest(state) != digest:
            raise CheckpointError(f"{path} is corrupt: its tensors do not match the SHA-256 stored when it was written")
        if torch.device(map_location) != torch.device("cpu"):
            state = {k: v.to(map_location) for k, v in state.items()}
        for name, root in aliases.items():
            if root not in state:
                raise CheckpointError(f"{path} is corrupt: alias {name!r} points to the missing tensor {root!r}")
            state[name] = state[root]
        return state
    obj = read_torch_file(path, map_location=map_location)
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            if extras is not None:
                extras.update((k, v) for k, v in obj.items() if k != wrapper)
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return dict(obj)


def read_torch_file(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> Any:
    """A ``torch.save`` file's object, loaded with ``weights_only=True`` (tensors, containers and plain
    values only: nothing that runs code), its zip CRCs checked first. ``mmap``: map the tensors instead of
    reading them (zip files only)."""
    path = Path(path)
    _check_zip_crc(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects other than tensors, which could run code "
            f"when unpickled (torch.load with weights_only=True refused it: {str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # truncated zip, bad header, ...
        raise CheckpointError(f"cannot read {path}: not a valid safetensors or torch.save file, truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _check_zip_crc(path: Path) -> None:
    """``torch.save`` files are zip archives with a CRC-32 per entry, which ``torch.load`` does not verify."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt torch.save archive ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: entry {bad!r} does not match its CRC-32")


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header size, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size < 100_000_000 and head[8:9] == b"{"
