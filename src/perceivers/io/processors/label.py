"""Class labels as an input modality (one token holding the one-hot / soft label vector)."""

from __future__ import annotations

from torch import Tensor, nn

from ...configurable import configurable
from ...validation import check_tensor
from .base import Preprocessed

__all__ = ["OneHotPreprocessor"]


@configurable
class OneHotPreprocessor(nn.Module):
    """``[B, num_classes]`` → one token ``[B, 1, num_classes]`` (no parameters, no positions)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_channels = self.feature_channels = num_classes

    def forward(self, labels: Tensor) -> Preprocessed:
        check_tensor(labels, "labels", kind="float", layout=f"[batch, {self.num_channels}] (one-hot or soft labels)")
        if labels.ndim != 2 or labels.shape[1] != self.num_channels:
            raise ValueError(f"labels must be [batch, {self.num_channels}], got {tuple(labels.shape)}")
        x = labels[:, None, :]
        return Preprocessed(x, None, x)
