"""Position-wise feed-forward networks."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .dense import Linear

__all__ = ["Activation", "FeedForward"]

Activation = Literal["geglu", "gelu", "gelu_tanh"]


class FeedForward(nn.Module):
    """``Linear → activation → Linear → Dropout`` with a hidden width of ``mult × dim``.

    Args:
        dim: input and output channels.
        mult: hidden width multiplier (perceiver-pytorch: 4; DeepMind's "widening factor": 1).
        activation: ``"geglu"`` (perceiver-pytorch: ``x · gelu(gate)``, the first half of ``fc1``'s
            output is ``x``, the second the gate), ``"gelu"`` (exact, erf) or ``"gelu_tanh"``
            (DeepMind's ``jax.nn.gelu`` default).
        dropout: dropout after the second linear layer.
    """

    def __init__(self, dim: int, mult: int = 4, activation: Activation = "geglu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("geglu", "gelu", "gelu_tanh"):
            raise ValueError(f"activation must be 'geglu', 'gelu' or 'gelu_tanh', got {activation!r}")
        hidden = dim * mult
        self.activation = activation
        self.fc1 = Linear(dim, hidden * 2 if activation == "geglu" else hidden)
        self.fc2 = Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., dim]`` → ``[..., dim]``."""
        h = self.fc1(x)
        if self.activation == "geglu":
            h, gate = h.chunk(2, dim=-1)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.fc2(h))
