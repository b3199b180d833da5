"""Rotary position embeddings (RoFormer, arXiv 2104.09864) on part of each head's channels.

Layout: the first ``rotated_channels`` of a head are rotated as two halves (channel ``i`` pairs with
``i + rotated_channels / 2``, the "rotate half" arrangement), the remaining channels pass through
unchanged. Positions are explicit, so right-aligned queries (Perceiver AR's latents are the last
positions of the sequence) and gathered keys (prefix dropout) need no special case.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding", "rotary_frequencies", "rotate"]


def rotary_frequencies(rotated_channels: int, base: float = 10000.0, device: torch.device | None = None) -> Tensor:
    """float32 ``base ** (-2i / rotated_channels)`` for ``i < rotated_channels / 2``: ``[rotated_channels / 2]``."""
    exponent = torch.arange(0, rotated_channels, 2, device=device, dtype=torch.float32) / max(rotated_channels, 1)
    return 1.0 / (base**exponent)


class RotaryEmbedding(nn.Module):
    """Rotation angles ``position × frequency`` for ``rotated_channels`` channels per head.

    Frequencies are :func:`rotary_frequencies`, each used for both halves. ``rotated_channels`` must be
    even (0 turns the rotation off). Angles are float32 (float64 in a float64 model), computed from the
    formula: a model cast to half precision would round a stored frequency table (bfloat16 angles are off
    by whole radians beyond position 256). ``inv_freq`` is kept as a buffer only for checkpoints that carry it (``persistent=True``:
    a state-dict entry, as lucidrains' Perceiver AR has).
    """

    def __init__(self, rotated_channels: int, base: float = 10000.0, *, persistent: bool = False) -> None:
        super().__init__()
        if rotated_channels < 0 or rotated_channels % 2:
            raise ValueError(f"rotated_channels must be even and >= 0, got {rotated_channels}")
        self.rotated_channels = rotated_channels
        self.base = base
        self.register_buffer("inv_freq", rotary_frequencies(rotated_channels, base), persistent=persistent)

    def forward(self, positions: Tensor) -> Tensor:
        """Positions ``[..., N]`` (integer or float) → angles ``[..., N, rotated_channels]``, float32 (float64
        once the module is cast to float64)."""
        dtype = torch.promote_types(self.inv_freq.dtype, torch.float32)  # the model's precision, at least float32
        # float32 frequencies in every precision (the peers' float32 tables, cast with the model)
        freqs = rotary_frequencies(self.rotated_channels, self.base, positions.device).to(dtype)
        half = positions.to(dtype)[..., None] * freqs
        return torch.cat((half, half), dim=-1)


def rotate(t: Tensor, angles: Tensor) -> Tensor:
    """Rotate the first ``angles.shape[-1]`` channels of ``t [B, H, N, d]``.

    ``angles`` is ``[N, r]`` (the same positions for every sample) or ``[B, 1, N, r]`` (per sample),
    from :class:`RotaryEmbedding`. Computed in float32 at least (cos and sin of large angles need it;
    float64 for float64 ``t``), returned in ``t``'s dtype.
    """
    r = angles.shape[-1]
    if r == 0:
        return t
    if r > t.shape[-1]:
        raise ValueError(f"cannot rotate {r} channels of heads {t.shape[-1]} wide")
    work = torch.promote_types(t.dtype, torch.float32)
    angles = angles.to(work)
    t_rot, t_pass = t[..., :r].to(work), t[..., r:]
    first, second = t_rot[..., : r // 2], t_rot[..., r // 2 :]
    turned = torch.cat((-second, first), dim=-1)  # multiplication by i in each (first, second) pair
    t_rot = t_rot * angles.cos() + turned * angles.sin()
    return torch.cat((t_rot.to(t.dtype), t_pass), dim=-1)
