"""Rotary position embeddings (RoFormer, arXiv 2104.09864) on part of each head's channels.

Layout: the first ``rotated_channels`` of a head are rotated as two halves (channel ``i`` pairs with
``i + rotated_channels / 2``, the "rotate half" arrangement), the remaining channels pass through
unchanged. Positions are explicit, so right-aligned queries (Perceiver AR's latents are the last
positions of the sequence) and gathered keys (prefix dropout) need no special case.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "rotate"]


class RotaryEmbedding(nn.Module):
    """Rotation angles ``position × frequency`` for ``rotated_channels`` channels per head.

    Frequencies are ``base ** (-2i / rotated_channels)`` for ``i < rotated_channels / 2``, each used for
    both halves. ``rotated_channels`` must be even (0 turns the rotation off).
    """

    def __init__(self, rotated_channels: int, base: float = 10000.0) -> None:
        super().__init__()
        if rotated_channels < 0 or rotated_channels % 2:
            raise ValueError(f"rotated_channels must be even and >= 0, got {rotated_channels}")
        self.rotated_channels = rotated_channels
        self.base = base
        exponent = torch.arange(0, rotated_channels, 2).float() / max(rotated_channels, 1)
        # a constant of the module, rebuilt on construction: not part of the state dict
        self.register_buffer("inv_freq", 1.0 / (base**exponent), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        """Positions ``[..., N]`` (integer or float) → angles ``[..., N, rotated_channels]``."""
        pos = positions.to(self.inv_freq.dtype)
        half = pos[..., None] * self.inv_freq  # [..., N, rotated / 2]
        return torch.cat((half, half), dim=-1)


def rotate(t: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first ``angles.shape[-1]`` channels of ``t [B, H, N, d]``.

    ``angles`` is ``[N, r]`` (the same positions for every sample) or ``[B, 1, N, r]`` (per sample),
    from :class:`RotaryEmbedding`. Computed in ``t``'s dtype.
    """
    r = angles.shape[-1]
    if r == 0:
        return t
    if r > t.shape[-1]:
        raise ValueError(f"cannot rotate {r} channels of heads {t.shape[-1]} wide")
    angles = angles.to(t.dtype)
    t_rot, t_pass = t[..., :r], t[..., r:]
    first, second = t_rot[..., : r // 2], t_rot[..., r // 2 :]
    turned = torch.cat((-second, first), dim=-1)  # multiplication by i in each (first, second) pair
    t_rot = t_rot * angles.cos() + turned * angles.sin()
    return torch.cat((t_rot, t_pass), dim=-1)
