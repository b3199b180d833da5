"""Generic output postprocessors: linear projections of the decoder output."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ...configurable import configurable
from ...layers.dense import Linear

__all__ = ["ClassificationPostprocessor", "ProjectionPostprocessor", "RowwisePostprocessor", "rowwise_parts"]


class RowwisePostprocessor(nn.Module):
    """A postprocessor that maps each decoded query on its own (:meth:`rowwise`, ``[B, q, C]`` →
    ``[B, q, K]``), then lays the rows out (:meth:`assemble`, ``[B, Q, K]`` → the output).

    A decoder that decodes its queries in chunks applies ``rowwise`` to each chunk, so its own
    ``C``-wide output for the whole query set is never built (see :func:`rowwise_parts`)."""

    def rowwise(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def assemble(self, y: Tensor) -> Tensor:
        return y

    def forward(self, x: Tensor) -> Tensor:
        return self.assemble(self.rowwise(x))


def rowwise_parts(post: nn.Module | None) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None:
    """``(rowwise, assemble)`` of a :class:`RowwisePostprocessor` whose output is ``assemble(rowwise(x))``
    (its ``forward`` not overridden), else ``None``."""
    if isinstance(post, RowwisePostprocessor) and type(post).forward is RowwisePostprocessor.forward:
        return post.rowwise, post.assemble
    return None


@configurable
class ProjectionPostprocessor(RowwisePostprocessor):
    """``[B, Q, C]`` → ``Linear`` → ``[B, Q, num_outputs]`` (e.g. RGB per decoded pixel)."""

    def __init__(self, in_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.linear = Linear(in_channels, num_outputs)

    def rowwise(self, x: Tensor) -> Tensor:
        return self.linear(x)


@configurable
class ClassificationPostprocessor(nn.Module):
    """``[B, Q, C]`` → ``Linear`` on query 0 → logits ``[B, num_classes]``."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x[:, 0])
