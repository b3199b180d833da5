"""Batches of inputs with different sizes: padding, masks and per-sample coordinates.

A Perceiver attends a set, so samples of different sizes can share a batch: pad every sample's
flattened elements to the longest, mask the padding out, and give each sample the coordinates of
its own grid (``linspace(-1, 1, n)`` per axis, as if it were alone). The model then computes the
same output for each sample as it would for that sample alone.

Example::

    data, pos, mask = pad_grid_batch([torch.randn(32, 48, 3), torch.randn(20, 20, 3)])
    logits = model(data, mask=mask, pos=pos)   # model: perceivers.Perceiver(input_axis=2, ...)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .layers import linear_positions
from .validation import check_finite, check_tensor

__all__ = ["pad_grid_batch", "pad_point_batch"]


def pad_point_batch(points: Sequence[Tensor], coords: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad sets of elements with their own coordinates.

    Args:
        points: per sample ``[n_i, C]`` features.
        coords: per sample ``[n_i, d]`` coordinates (scale them to ``[-1, 1]`` for Fourier features), of any
            floating dtype.

    Returns:
        ``data [B, M, C]``, ``pos [B, M, d]`` (in the points' dtype), ``mask [B, M]`` (True = real element),
        ``M = max n_i``.
    """
    if len(points) == 0 or len(points) != len(coords):
        raise ValueError(f"need as many coordinate sets as point sets (≥1), got {len(points)} and {len(coords)}")
    for i, (p, c) in enumerate(zip(points, coords)):
        check_tensor(p, f"points[{i}]", kind="float", layout="[n, C]")
        check_tensor(c, f"coords[{i}]", kind="float", layout="[n, d]")
        for name, t in ((f"points[{i}]", p), (f"coords[{i}]", c)):
            if t.device != points[0].device or (t is p and t.dtype != points[0].dtype):
                raise TypeError(f"{name} is {t.dtype} on {t.device} but points[0] is {points[0].dtype} on "
                                f"{points[0].device}; the samples must share one dtype and device (their coordinates "
                                "the device; any float dtype)")
            check_finite(t, name)
    channels, dims = points[0].shape[-1], coords[0].shape[-1]
    for i, (p, c) in enumerate(zip(points, coords)):
        if p.ndim != 2 or p.shape[-1] != channels:
            raise ValueError(f"sample {i}: features must be [n, {channels}], got {tuple(p.shape)}")
        if c.shape != (p.shape[0], dims):
            raise ValueError(f"sample {i}: coordinates must be [{p.shape[0]}, {dims}], got {tuple(c.shape)}")
    longest = max(p.shape[0] for p in points)
    ref = points[0]
    data = ref.new_zeros(len(points), longest, channels)
    pos = ref.new_zeros(len(points), longest, dims)
    mask = torch.zeros(len(points), longest, dtype=torch.bool, device=ref.device)
    for i, (p, c) in enumerate(zip(points, coords)):
        data[i, : p.shape[0]] = p
        pos[i, : p.shape[0]] = c.to(pos.dtype)
        mask[i, : p.shape[0]] = True
    return data, pos, mask


def pad_grid_batch(samples: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad grid samples ``[*axes_i, C]`` of different sizes (same number of axes) into one batch.

    Returns ``data [B, M, C]``, ``pos [B, M, d]`` (each sample's own ``[-1, 1]`` grid, row-major)
    and ``mask [B, M]``.
    """
    if len(samples) == 0:
        raise ValueError("pad_grid_batch needs at least one sample")
    for i, s in enumerate(samples):
        check_tensor(s, f"samples[{i}]", kind="float", layout="[*axes, C]")
    dims = samples[0].ndim - 1
    for i, s in enumerate(samples):
        if s.ndim != dims + 1:
            raise ValueError(f"sample {i}: expected {dims} axes + channels, got shape {tuple(s.shape)}")
    points = [s.reshape(-1, s.shape[-1]) for s in samples]
    dtype = torch.promote_types(samples[0].dtype, torch.float32)  # float64 grids in float64
    coords = [linear_positions(s.shape[:-1], device=s.device, dtype=dtype).reshape(-1, dims) for s in samples]
    return pad_point_batch(points, coords)
