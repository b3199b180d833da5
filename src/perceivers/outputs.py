"""Model outputs that ``torch.export`` and ``torch.compile`` can see through."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch

__all__ = ["TransformersIndexing", "model_output"]

T = TypeVar("T", bound=type)


def model_output(cls: T) -> T:
    """Class decorator for output dataclasses: registers ``cls`` as a pytree node with ``torch.export``.

    Its fields (tensors, dicts of tensors, ``None``) then flatten like a tuple, so an exported or
    compiled model may return it directly. Apply above ``@dataclass``.
    """
    torch.export.register_dataclass(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls


class TransformersIndexing:
    """transformers' ``ModelOutput`` access on an output dataclass: ``out[0]``, ``out["logits"]``, ``out.to_tuple()``.

    Integer indices and :meth:`to_tuple` run over ``loss, logits, hidden_states, attentions,
    cross_attentions`` (transformers' field order), leaving out the ``None`` ones.
    """

    _transformers_fields: ClassVar[tuple[str, ...]] = ("loss", "logits", "hidden_states", "attentions",
                                                        "cross_attentions")

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f, None) for f in self._transformers_fields) if v is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]
