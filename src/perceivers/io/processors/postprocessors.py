"""Generic output postprocessors: linear projections of the decoder output."""

from __future__ import annotations

from torch import Tensor, nn

from ...configurable import configurable
from ...layers.dense import Linear

__all__ = ["ClassificationPostprocessor", "ProjectionPostprocessor"]


@configurable
class ProjectionPostprocessor(nn.Module):
    """``[B, Q, C]`` → ``Linear`` → ``[B, Q, num_outputs]`` (e.g. RGB per decoded pixel)."""

    def __init__(self, in_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.linear = Linear(in_channels, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


@configurable
class ClassificationPostprocessor(nn.Module):
    """``[B, Q, C]`` → ``Linear`` on query 0 → logits ``[B, num_classes]``."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x[:, 0])
