"""Named model variants: ``@register_model`` builders, ``create_model`` and ``list_models``."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from ..validation import check_config_types
from .pretrained import PretrainedCfg

__all__ = ["ModelEntry", "config_from_overrides", "create_model", "list_models", "model_entry", "register_model"]

_REGISTRY: dict[str, ModelEntry] = {}

C = TypeVar("C")


@dataclass(frozen=True)
class ModelEntry:
    """A registered variant: its builder, pretrained metadata and tiny test sizes."""

    name: str
    builder: Callable[..., nn.Module]
    pretrained: PretrainedCfg | None = None
    tiny: Mapping[str, Any] = field(default_factory=dict)


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    name: str | None = None,
    pretrained: PretrainedCfg | None = None,
    tiny: Mapping[str, Any] | None = None,
):
    """Register ``fn(**overrides) -> nn.Module`` under ``name`` (default: the function name with ``-``).

    ``tiny`` holds overrides giving a small model of the same structure, for fast tests.
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__.replace("_", "-")
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        _REGISTRY[key] = ModelEntry(key, builder, pretrained, dict(tiny or {}))
        return builder

    return wrap if fn is None else wrap(fn)


def _load_builders() -> None:
    # Importing the task modules runs their @register_model decorators.
    from . import (  # noqa: F401
        image_classification,
        language,
        multimodal,
        optical_flow,
        text_classification,
        token_classification,
    )


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered variants matching the glob ``pattern``."""
    _load_builders()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of ``name``; ``ValueError`` listing the known names otherwise."""
    _load_builders()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, *, tiny: bool = False, **overrides: Any) -> nn.Module:
    """Build the registered variant ``name`` with randomly initialised weights.

    Args:
        name: one of :func:`list_models`.
        tiny: start from the variant's small test sizes instead of the official ones.
        **overrides: config fields (e.g. ``num_latents=128``, ``num_labels=10``); unknown names raise
            ``TypeError`` listing the valid ones.

    The model gets ``model_name`` and ``pretrained_cfg`` attributes; ``create_model(m.model_name,
    **dataclasses.asdict(m.config))`` rebuilds the same architecture.
    """
    entry = model_entry(name)
    if not isinstance(tiny, bool):
        raise TypeError(f"tiny must be a bool, got {tiny!r} ({type(tiny).__name__})")  # "false" is truthy
    kwargs = {**(entry.tiny if tiny else {}), **overrides}
    model = entry.builder(**kwargs)
    model.model_name = name
    model.pretrained_cfg = entry.pretrained
    return model


def config_from_overrides(config_cls: type[C], defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> C:
    """``config_cls(**defaults, **overrides)`` with a clear error for unknown override names and for values of
    the wrong type (a size given as ``"256"``)."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(
            f"{config_cls.__name__} has no field(s) {', '.join(unknown)}; valid overrides: {', '.join(sorted(valid))}"
        )
    check_config_types(overrides, config_cls)
    return config_cls(**{**defaults, **overrides})
