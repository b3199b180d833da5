"""Position-wise feed-forward networks."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .dense import Linear, geglu, gelu, linear_geglu, linear_gelu

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
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        if _plain(self.fc1):  # the activation may run inside the first product (see dense.linear_gelu)
            weight, bias = self.fc1.weight, self.fc1.bias
            h = linear_geglu(x, weight, bias) if self.activation == "geglu" else linear_gelu(x, weight, bias, approximate)
        else:  # a replaced or hooked first layer (adapters, quantisation) is called as a module
            h = self.fc1(x)
            h = geglu(h) if self.activation == "geglu" else gelu(h, approximate)
        return self.dropout(self.fc2(h))


def _plain(layer: nn.Module) -> bool:
    """Whether ``layer`` is our :class:`Linear` with no forward hooks, so that its function may replace its call."""
    hooks = nn.modules.module
    return (
        type(layer) is Linear
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
    )
