"""Save and load models: our own format, the Hugging Face Hub, and any supported checkpoint.

Own format, one directory::

    config.json        {"format": "perceivers", "format_version": 1, "model": {...}}
    model.safetensors  the state dict (tied tensors stored once)

``"model"`` is either ``{"registry": name, "config": {...}}`` for :func:`perceivers.tasks.create_model`
variants (rebuilt with ``create_model(name, **config)``) or ``{"class": "perceivers....", "kwargs":
{...}}`` for classes decorated with :func:`perceivers.configurable.configurable` (the
perceiver-pytorch family and every exported model class).

:func:`from_pretrained` takes a directory or a Hub repo id (``owner/name``); repo ids go through
``huggingface_hub.snapshot_download`` and therefore its cache, so they work offline
(``HF_HUB_OFFLINE=1``) once downloaded. Directories in transformers' format (``model_type:
"perceiver"``) are converted on the fly. :func:`load_checkpoint` loads weights of any supported
format into an existing model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configurable import init_config
from .safe_files import atomic_path, read_json

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "build_model",
    "detect_format",
    "fit_checkpoint_config",
    "from_pretrained",
    "load_checkpoint",
    "model_config",
    "resolve",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "perceivers"
FORMAT_VERSION = 1
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HAIKU_SUFFIXES = (".pystate", ".pickle", ".pkl")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# ----------------------------------------------------------------------------------------------- config


def model_config(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``: ``{"registry": …, "config": …}`` or ``{"class": …, "kwargs": …}``."""
    config = getattr(model, "config", None)
    name = getattr(model, "model_name", None)
    if isinstance(name, str) and dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {"registry": name, "config": json.loads(json.dumps(dataclasses.asdict(config), default=_no_json))}
    return init_config(model)


def _no_json(value: Any) -> Any:
    raise TypeError(f"cannot save config value {value!r} of type {type(value).__name__} as JSON")


def _import_class(path: str, allow_external: bool, *, dataclass: bool = False) -> type:
    """The class a config names: an ``nn.Module`` (or, with ``dataclass``, a dataclass) of perceivers or
    ``torch.nn`` unless ``allow_external``. Other classes are refused before they are built: a config file
    is untrusted input, and a class of these packages that is neither (the training CLI, a file writer it
    imports) would run with the file's arguments."""
    if not allow_external and not path.startswith(("perceivers.", "torch.nn.")):
        raise ValueError(f"refusing to import {path!r} from a config: only perceivers classes are allowed "
                         "(pass allow_external_classes=True to trust it)")
    module, _, name = path.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise TypeError(f"{path} is not a class")
    if dataclass and not dataclasses.is_dataclass(obj):
        raise TypeError(f"refusing to build {path} from a config: it is not a dataclass")
    if not dataclass and not issubclass(obj, nn.Module):
        raise TypeError(f"refusing to build {path} from a config: it is not a torch.nn.Module")
    return obj


def _decode(value: Any, allow_external: bool) -> Any:
    if isinstance(value, list):
        return [_decode(v, allow_external) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v, allow_external) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, allow_external) for k, v in value["__dict__"].items()}
    if "__module__" in value:
        return build_model(value["__module__"], allow_external_classes=allow_external)
    if "__dataclass__" in value:
        cls = _import_class(value["__dataclass__"], allow_external, dataclass=True)
        return cls(**{k: _decode(v, allow_external) for k, v in value["fields"].items()})
    raise ValueError(f"unrecognised config entry {value!r}")


def build_model(config: dict[str, Any], *, allow_external_classes: bool = False) -> nn.Module:
    """A freshly initialised model from the ``"model"`` entry of a config (see :func:`model_config`)."""
    if "registry" in config:
        from .tasks import create_model

        return create_model(config["registry"], **config.get("config", {}))
    if "class" in config:
        cls = _import_class(config["class"], allow_external_classes)
        kwargs = {k: _decode(v, allow_external_classes) for k, v in config.get("kwargs", {}).items()}
        args = kwargs.pop("*args", [])  # a recorded *args parameter (see configurable)
        return cls(*args, **kwargs)
    raise ValueError(f"model config needs a 'registry' or a 'class' entry, got keys {sorted(config)}")


def fit_checkpoint_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model entry (as :func:`model_config`'s) that a ``perceivers fit`` checkpoint records, or ``None``
    for any other file.

    Lightning saves the task's settings: a registered ``model_name`` with its ``model_kwargs``, or the
    model as ``class_path`` + ``init_args`` (nested modules alike), rebuilt by :func:`build_model` with
    the same rule as our configs (perceivers classes only). Read with ``weights_only=True``, tensors
    memory-mapped.
    """
    from .convert.state_dict import read_torch_file

    path = Path(path)
    if not path.is_file() or detect_format(path) != "torch":
        return None
    return _fit_config(read_torch_file(path, mmap=zipfile.is_zipfile(path)), path)


def _fit_config(obj: Any, path: Path) -> dict[str, Any] | None:
    """:func:`fit_checkpoint_config` of the loaded file ``obj``."""
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hparams, dict) or not isinstance(obj.get("state_dict"), dict):
        return None
    if hparams.get("model_name"):
        return {"registry": hparams["model_name"], "config": dict(hparams.get("model_kwargs") or {})}
    model = hparams.get("model")
    if isinstance(model, dict) and isinstance(model.get("class_path"), str):
        return _from_class_path(model)["__module__"]
    raise ValueError(f"{path} is a training checkpoint whose model was given as a Python object, which it does not "
                     "record: build the model yourself and use load_checkpoint(model, path)")


def _from_class_path(value: Any) -> Any:
    """jsonargparse's ``{"class_path", "init_args"}`` form → our config encoding (see :func:`_decode`)."""
    if isinstance(value, (list, tuple)):
        return [_from_class_path(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "class_path" in value:
        kwargs = {k: _from_class_path(v) for k, v in (value.get("init_args") or {}).items()}
        return {"__module__": {"class": value["class_path"], "kwargs": kwargs}}
    return {"__dict__": {k: _from_class_path(v) for k, v in value.items()}}


# ------------------------------------------------------------------------------------------ save / load


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike[str], *,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``model`` into ``save_directory``.

    Args:
        extra: JSON-able metadata stored next to the model config (e.g. labels, training info).

    Returns:
        the directory.

    Raises:
        ValueError: ``save_directory`` (or a parent) is a file.
    """
    from .convert.state_dict import save_state_dict

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "perceivers_version": _version(),
        "model": model_config(model),
    }
    if extra:
        config["extra"] = extra
    directory = _make_directory(save_directory)
    # Both files are written completely before either replaces its previous version, so a crash or a
    # full disk while saving leaves the previous (config, weights) pair as it was.
    with atomic_path(directory / WEIGHTS_NAME) as weights, atomic_path(directory / CONFIG_NAME) as config_file:
        save_state_dict(model.state_dict(), weights, metadata={"perceivers.format": FORMAT})
        config_file.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return directory


def _check_directory(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path``, after checking that neither it nor a parent is a file (``ValueError`` if so)."""
    directory = Path(path)
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == directory else f" (a parent of {directory})"
                raise ValueError(f"{candidate}{where} is a file, not a directory")
            break
    return directory


def _make_directory(path: str | os.PathLike[str]) -> Path:
    """Create the directory ``path`` (and its parents) to write into; ``ValueError`` where a file is in the way."""
    directory = _check_directory(path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _version() -> str:
    from . import __version__

    return __version__


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local file/directory as is, or a Hub repo id → its snapshot directory (via the HF cache).

    With ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) only the cache is consulted.

    Raises:
        FileNotFoundError: ``name_or_path`` is not an existing path, and not a repo id the Hub (or the
            cache) can provide; the message names it and gives the download's reason on one line.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    name = os.fspath(name_or_path)
    if not _REPO_ID.match(name):
        raise FileNotFoundError(f"{name!r} is neither an existing path nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "token": token}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        return Path(snapshot_download(name, **kwargs))
    except (OSError, ValueError) as e:  # huggingface_hub's errors: offline, no such repo, network, bad id
        raise FileNotFoundError(f"{name!r} is not an existing local path, and fetching Hub repo {name!r} failed "
                                f"(offline, not cached, or no such repo): {_one_line(e)}") from e


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of ``error``, plus its root cause when the message does not name it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not error and type(cause).__name__ not in text:
        text += f" (from {type(cause).__name__}: {' '.join(str(cause).split())})"
    return text


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"perceivers"``, ``"transformers"``, ``"haiku"``, ``"safetensors"`` or ``"torch"`` for a local path.

    Directories are told apart by their ``config.json``; files by their first bytes (safetensors
    header, zip archive = ``torch.save``, pickle = Haiku unless the suffix says ``torch.save``).
    """
    from .convert.state_dict import is_safetensors

    path = Path(path)
    if path.is_dir():
        cfg_path = path / CONFIG_NAME
        if not cfg_path.exists():
            weights = _weights_files(path)
            if len(weights) == 1:
                return detect_format(weights[0])
            raise ValueError(f"{path} has no {CONFIG_NAME} and {len(weights)} weight files; pass one file")
        cfg = read_json(cfg_path)
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
        if cfg.get("format") == FORMAT:
            return "perceivers"
        if cfg.get("model_type") == "perceiver":
            return "transformers"
        raise ValueError(f"{cfg_path} is neither a perceivers config (\"format\": {FORMAT!r}) nor a transformers "
                         f"Perceiver config (\"model_type\": \"perceiver\"); it has format={cfg.get('format')!r}, "
                         f"model_type={cfg.get('model_type')!r}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
    if is_safetensors(path):
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80":
        return "torch" if path.suffix in _TORCH_SUFFIXES else "haiku"
    raise ValueError(f"cannot tell the format of {path} (not safetensors, a torch.save archive or a pickle of "
                     "protocol 2 or later; older pickles are not read)")


def _weights_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and (p.suffix == ".safetensors" or p.suffix in _TORCH_SUFFIXES + _HAIKU_SUFFIXES))


def _read_config(directory: Path) -> dict[str, Any]:
    return read_json(directory / CONFIG_NAME)


def _own_weights(directory: Path) -> Path:
    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return path


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    map_location: str | torch.device = "cpu",
    allow_external_classes: bool = False,
    **transformers_options: Any,
) -> nn.Module:
    """Build a model and load its weights from a directory, a Hub repo id or a training checkpoint.

    Own-format directories are rebuilt from their config; transformers Perceiver checkpoints
    (``config.json`` with ``model_type: "perceiver"``) are converted with
    :func:`perceivers.convert.transformers.from_transformers` (``transformers_options`` go there);
    ``perceivers fit`` checkpoints (``.ckpt``) are rebuilt from the settings they record
    (:func:`fit_checkpoint_config`). The model is returned in eval mode, in the checkpoint's dtype (a float64,
    bfloat16 or float16 checkpoint stays so, as transformers' ``dtype="auto"``).
    """
    from .convert.state_dict import (
        adopt_checkpoint_dtype,
        load_state_dict_strict,
        read_state_dict,
        read_torch_file,
    )

    directory = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                        token=token)
    if not directory.is_dir():  # a perceivers fit checkpoint: read once, for its settings and its weights
        obj = read_torch_file(directory, map_location=map_location) if detect_format(directory) == "torch" else None
        config = None if obj is None else _fit_config(obj, directory)
        if config is None:
            raise ValueError(f"from_pretrained needs a directory, a repo id or a perceivers fit checkpoint, got the "
                             f"file {directory}; use load_checkpoint(model, path) for bare weight files")
        model = _build(config, allow_external_classes, directory)
        state = {k.removeprefix("model."): v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        load_state_dict_strict(adopt_checkpoint_dtype(model, state), state, source=str(directory))
        return model.to(map_location).eval()
    fmt = detect_format(directory)
    if fmt == "transformers":
        from .convert.transformers import from_transformers

        return from_transformers(directory, map_location=map_location, **transformers_options).eval()
    if fmt != "perceivers":
        raise ValueError(f"{directory} holds bare weights ({fmt}); build the model and use load_checkpoint")
    if transformers_options:
        raise TypeError(f"unexpected options for a perceivers checkpoint: {sorted(transformers_options)}")
    config = _read_config(directory)
    if int(config.get("format_version", 1)) > FORMAT_VERSION:
        raise ValueError(f"{directory} was written by a newer perceivers (format {config['format_version']})")
    model = _build(config["model"], allow_external_classes, directory / CONFIG_NAME,
                   saved_by=config.get("perceivers_version"))
    state = read_state_dict(_own_weights(directory), map_location=map_location)
    load_state_dict_strict(adopt_checkpoint_dtype(model, state), state, source=str(directory))
    return model.to(map_location).eval()


def _build(config: dict[str, Any], allow_external_classes: bool, source: Path, *,
           saved_by: str | None = None) -> nn.Module:
    """:func:`build_model`, its errors naming ``source`` (e.g. a size written as "256" in an edited config.json)
    and, when ``saved_by`` is a newer perceivers version than this one, saying so (its configs may carry
    fields this version does not know)."""
    try:
        return build_model(config, allow_external_classes=allow_external_classes)
    except (TypeError, ValueError) as err:
        if type(err) not in (TypeError, ValueError):
            raise
        hint = ""
        if _newer(saved_by):
            hint = (f" (saved by perceivers {saved_by}, newer than this {_version()}: upgrade perceivers to load "
                    "what that version added)")
        raise type(err)(f"{source}: {err}{hint}") from err


def _newer(version: Any) -> bool:
    """Whether ``version`` (as recorded in a config) is a perceivers release newer than this one."""
    from packaging.version import InvalidVersion, Version

    try:
        return isinstance(version, str) and Version(version) > Version(_version())
    except InvalidVersion:
        return False


def load_checkpoint(
    model: nn.Module,
    path_or_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load weights of any supported format into ``model`` (strictly) and return it.

    ``path_or_id`` is dispatched on its content:

    - a Haiku pickle (``.pystate``/``.pickle``): :func:`perceivers.convert.haiku.load_haiku_checkpoint`;
    - a transformers directory / repo: key tables of :mod:`perceivers.convert.transformers`;
    - a perceivers directory (``save_pretrained``): its ``model.safetensors``;
    - a ``.safetensors`` or ``torch.save`` state dict (our names, or transformers' ``perceiver.*``
      names, or perceiver-pytorch's, its variants' and the multi-modality fork's, by the model's family).

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped tensors.
    """
    from .convert.state_dict import load_state_dict_strict, read_state_dict

    path = resolve(path_or_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    fmt = detect_format(path)
    source = str(path)
    if fmt == "haiku":
        from .convert.haiku import load_haiku_checkpoint

        load_haiku_checkpoint(model, path)
        return model
    if fmt == "transformers":
        from .convert.transformers import load_transformers_weights

        return load_transformers_weights(model, path, map_location=map_location)
    if fmt == "perceivers":
        path = _own_weights(path)
        fmt = "safetensors"
    if path.is_dir():  # a directory with a single weights file
        path = _weights_files(path)[0]
    extras: dict = {}
    state = read_state_dict(path, map_location=map_location, extras=extras)
    state = _translate_foreign(model, state, source=source, hparams=extras.get("hyper_parameters"))
    return load_state_dict_strict(model, state, source=source)


def _translate_foreign(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint",
                       hparams: object = None) -> dict[str, torch.Tensor]:
    """Rename a bare state dict written by another library, when its names say so (else leave it); prefixes of
    wrappers (``torch.compile``'s ``_orig_mod.``, DistributedDataParallel's ``module.``) are removed first.
    ``hparams``: a Lightning checkpoint's ``hyper_parameters``, where krasserm's Perceiver AR records what its
    state dict cannot show (checked against the model).

    perceiver-pytorch-style names (``layers.…``) go to the converter of the model's family: the multi-modality
    fork's models, perceiver-pytorch's gated / mixed-latents / experimental variants, else the core Perceivers."""
    from .convert.state_dict import strip_wrapper_prefixes

    state = dict(strip_wrapper_prefixes(state))
    own = model.state_dict()
    if not state or len(set(state) & set(own)) >= len(state) / 2:
        return state
    if all(k.startswith("model.") for k in state):  # a perceivers.train (Lightning) checkpoint's state_dict
        state = {k.removeprefix("model."): v for k, v in state.items()}
        if len(set(state) & set(own)) >= len(state) / 2:
            return state
    from .convert.jobr0 import convert_jobr0_state_dict, is_jobr0_state_dict

    if is_jobr0_state_dict(state):  # JOBR0/PerceiverIO_Pytorch's converted official checkpoints
        return convert_jobr0_state_dict(state, model)
    from .convert.krasserm import _INV_FREQ, check_hyperparameters, from_krasserm_perceiver_ar
    from .models.perceiver_ar import PerceiverAR

    if _INV_FREQ in state and isinstance(model, PerceiverAR):  # krasserm's perceiver-io Perceiver AR
        if isinstance(hparams, Mapping):
            check_hyperparameters(hparams, model, source=source)
        return from_krasserm_perceiver_ar(state, model)
    if "perceiver.embeddings.latents" in state or any(".attention.self." in k for k in state):
        from .convert.transformers import convert_transformers_state_dict

        return convert_transformers_state_dict(state, model)
    if any(k.startswith("layers.") or ".to_kv." in k for k in state):
        return _translate_lucidrains_style(model, state, source)
    return state


def _translate_lucidrains_style(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """perceiver-pytorch / multi-modality-fork names → ours, by the converter of ``model``'s family; a tensor
    that converter does not know is a :class:`CheckpointError` naming the file, the model and the tensor."""
    from .convert.lucidrains import from_lucidrains
    from .convert.lucidrains_variants import from_lucidrains_variant
    from .convert.multimodal_fork import from_multimodality_fork
    from .convert.state_dict import CheckpointError
    from .models.experimental import BottomUpPerceiver
    from .models.multimodal import HierarchicalMultiModalityPerceiver, MultiModalityPerceiver
    from .models.variants import GatedPerceiver, MixedLatentsPerceiver

    variants = {GatedPerceiver: "gated", MixedLatentsPerceiver: "mixed_latents", BottomUpPerceiver: "experimental"}
    variant = next((v for cls, v in variants.items() if isinstance(model, cls)), None)
    if isinstance(model, (MultiModalityPerceiver, HierarchicalMultiModalityPerceiver)):
        convert, family = from_multimodality_fork, "the multi-modality fork's layout"
    elif variant is not None:
        def convert(s):
            return from_lucidrains_variant(s, variant)
        family = f"perceiver-pytorch's {variant} layout"
    else:
        convert, family = from_lucidrains, "perceiver-pytorch's layout"
    try:
        return convert(state)
    except KeyError as e:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: its tensor {e.args[0]!r} has no place "
                              f"in {family} (a checkpoint of another model?)") from e
