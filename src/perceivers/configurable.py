"""Remember how a module was constructed, so it can be rebuilt from JSON (``save_pretrained``).

``@configurable`` on an ``nn.Module`` class records the arguments of each construction (defaults
filled in) on the instance; :func:`init_config` returns them as ``{"class": "pkg.mod.Class",
"kwargs": {...}}``. Module-valued arguments (dependency-injected processors, encoders, …) are
recorded recursively when their classes are configurable too; dataclass configs by their fields.
Imports nothing of ours, so any module of the package may use it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterator
from typing import Any, TypeVar

__all__ = ["configurable", "init_config", "is_configurable"]

T = TypeVar("T", bound=type)

_ATTR = "_perceivers_init_kwargs"


def configurable(cls: T) -> T:
    """Class decorator: record ``__init__``'s bound arguments on each instance.

    Subclasses that define their own ``__init__`` must be decorated too; one that only inherits
    ``__init__`` is recorded with its own class name.
    """
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # one-shot iterators (generators of modalities, …) are read once here so they can be recorded
        args = tuple(list(a) if isinstance(a, Iterator) else a for a in args)
        kwargs = {k: list(v) if isinstance(v, Iterator) else v for k, v in kwargs.items()}
        original(self, *args, **kwargs)
        if getattr(type(self).__init__, "__perceivers_configurable__", None) is not cls:
            return  # a subclass with its own __init__ records itself
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        recorded: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    recorded[f"*{name}"] = list(value)
            else:
                recorded[name] = value
        object.__setattr__(self, _ATTR, recorded)

    __init__.__perceivers_configurable__ = cls  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def is_configurable(obj: object) -> bool:
    """Whether ``obj`` carries recorded constructor arguments."""
    return hasattr(obj, _ATTR)


def _class_path(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(value: Any, where: str) -> Any:
    """A constructor argument → JSON-able data (tuples, modules and dataclasses tagged)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: dict keys must be strings to be saved, got {list(value)}")
        return {"__dict__": {k: _encode(v, f"{where}.{k}") for k, v in value.items()}}
    if is_configurable(value):
        return {"__module__": init_config(value)}
    if type(value).__name__ == "Embedding" and type(value).__module__.startswith("torch.nn"):
        return {"__module__": {"class": "torch.nn.Embedding", "kwargs": {
            "num_embeddings": value.num_embeddings, "embedding_dim": value.embedding_dim,
            "padding_idx": value.padding_idx}}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": _class_path(value), "fields": fields}
    raise TypeError(
        f"{where}: cannot save a constructor argument of type {type(value).__name__}; "
        "make its class @configurable or pass JSON-able values"
    )


def init_config(module: object) -> dict[str, Any]:
    """``{"class": path, "kwargs": {...}}`` of a configurable instance (JSON-able)."""
    if not is_configurable(module):
        raise TypeError(
            f"{_class_path(module)} did not record its constructor arguments, so it cannot be rebuilt from a config: "
            "decorate your own model class with @perceivers.configurable.configurable, or save its weights alone "
            "(perceivers.convert.state_dict.save_state_dict, torch.save(model.state_dict()))"
        )
    kwargs = getattr(module, _ATTR)
    name = type(module).__name__
    return {"class": _class_path(module), "kwargs": {k: _encode(v, f"{name}.{k}") for k, v in kwargs.items()}}
