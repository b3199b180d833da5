"""Model outputs that ``torch.export`` and ``torch.compile`` can see through."""

from __future__ import annotations

from typing import TypeVar

import torch

__all__ = ["model_output"]

T = TypeVar("T", bound=type)


def model_output(cls: T) -> T:
    """Class decorator for output dataclasses: registers ``cls`` as a pytree node with ``torch.export``.

    Its fields (tensors, dicts of tensors, ``None``) then flatten like a tuple, so an exported or
    compiled model may return it directly. Apply above ``@dataclass``.
    """
    torch.export.register_dataclass(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls
