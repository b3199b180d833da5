"""Position features for the input preprocessors: ``forward(index_shape) -> [N, C]``.

Every module here maps the index shape of a preprocessed input (e.g. ``(H, W)`` or ``(T, H, W)``)
to one feature row per index, flattened row-major, exposes ``num_channels`` at construction, and
gives rows ``start:stop`` alone with ``grid_rows(index_shape, start, stop)`` (streamed inputs) and rows by
position with ``grid_gather(index_shape)(index)`` (streamed in a ``torch.while_loop`` by exported programs):

* :class:`~perceivers.layers.FourierPositionEncoding` (DeepMind layout) — used directly;
* :class:`TrainableGridPositions` — a learned table whose size fixes the number of positions;
* :class:`ProjectedPositions` — another encoding followed by a ``Linear`` (DeepMind's
  ``project_pos_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import FourierPositionEncoding, TrainablePositionEncoding
from ..layers.dense import Linear

__all__ = ["ProjectedPositions", "TrainableGridPositions", "build_position_encoding", "has_grid_rows"]

PositionKind = Literal["fourier", "trainable", "none"]


@configurable
class TrainableGridPositions(nn.Module):
    """A learned ``[prod(index_shape), num_channels]`` table (truncated normal, std ``init_scale``).

    The table is bound to ``index_shape``: any other index shape raises a ``ValueError``, also one
    with as many positions (``(W, H)`` for ``(H, W)``, or a flattened ``(H·W,)``), whose rows would
    land on other pixels.
    """

    def __init__(self, index_shape: Sequence[int], num_channels: int, init_scale: float = 0.02) -> None:
        super().__init__()
        self.index_shape = tuple(int(n) for n in index_shape)
        self.num_channels = num_channels
        self.table = TrainablePositionEncoding(math.prod(self.index_shape), num_channels, init_scale)

    def forward(
        self, index_shape: Sequence[int], *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``index_shape`` must equal the construction shape → ``[N, num_channels]``."""
        if tuple(index_shape) != self.index_shape:
            raise ValueError(
                f"trainable positions were built for index shape {self.index_shape} "
                f"({math.prod(self.index_shape)} positions), got {tuple(index_shape)}"
            )
        table = self.table.embeddings
        return table if dtype is None else table.to(dtype)

    def grid_rows(
        self, index_shape: Sequence[int], start: int, stop: int, *, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Rows ``start:stop`` of ``forward(index_shape)`` ``[stop - start, num_channels]``."""
        rows = self(index_shape, device=device)[start:stop]
        return rows if dtype is None else rows.to(dtype)

    def grid_gather(
        self, index_shape: Sequence[int], *, device: torch.device | None = None, dtype: torch.dtype | None = None,
        lengths: Sequence[int] | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """A function: flat positions ``index`` (int64 ``[n]``) → those rows of ``forward(index_shape)`` ``[n, C]``
        (one table of a fixed size: ``lengths`` does not apply)."""
        table = self(index_shape, device=device, dtype=dtype)
        return lambda index: table.index_select(0, index)

    def extra_repr(self) -> str:
        return f"index_shape={self.index_shape}, num_channels={self.num_channels}"


@configurable
class ProjectedPositions(nn.Module):
    """``Linear(base.num_channels → num_channels)`` applied to another position encoding."""

    def __init__(self, base: nn.Module, num_channels: int) -> None:
        super().__init__()
        self.base = base
        self.num_channels = num_channels
        self.proj = Linear(base.num_channels, num_channels)

    def forward(
        self, index_shape: Sequence[int], *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``[N, base.num_channels]`` → ``[N, num_channels]``."""
        base = self.base(index_shape, device=device, dtype=self.proj.weight.dtype if dtype is None else dtype)
        return self.proj(base)

    def grid_rows(
        self, index_shape: Sequence[int], start: int, stop: int, *, device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Rows ``start:stop`` of ``forward(index_shape)``: the base's rows, projected."""
        base = self.base.grid_rows(index_shape, start, stop, device=device,
                                   dtype=self.proj.weight.dtype if dtype is None else dtype)
        return self.proj(base)

    def grid_gather(
        self, index_shape: Sequence[int], *, device: torch.device | None = None, dtype: torch.dtype | None = None,
        lengths: Sequence[int] | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """A function: flat positions ``index`` (int64 ``[n]``) → those rows of ``forward(index_shape)``: the
        base's rows (:meth:`FourierPositionEncoding.grid_gather`: per-axis tables computed here, once), projected."""
        base = self.base.grid_gather(index_shape, device=device, lengths=lengths,
                                     dtype=self.proj.weight.dtype if dtype is None else dtype)
        return lambda index: self.proj(base(index))


def has_grid_rows(encoding: nn.Module | None) -> bool:
    """Whether ``encoding`` gives rows of its grid alone (``grid_rows``), so that inputs can be streamed."""
    if encoding is None:
        return True
    if isinstance(encoding, ProjectedPositions):
        return has_grid_rows(encoding.base)
    return callable(getattr(encoding, "grid_rows", None))


def build_position_encoding(
    kind: PositionKind,
    *,
    num_dims: int,
    index_shape: Sequence[int] | None = None,
    num_bands: int = 64,
    max_resolution: Sequence[float] | None = None,
    concat_pos: bool = True,
    sine_only: bool = False,
    num_channels: int = 256,
    init_scale: float = 0.02,
    project_pos_dim: int = -1,
) -> nn.Module | None:
    """DeepMind's ``build_position_encoding``: Fourier or trainable, optionally projected.

    Args:
        kind: ``"fourier"``, ``"trainable"`` or ``"none"`` (returns ``None``).
        num_dims: number of index axes (2 for images, 3 for video, 1 for audio).
        index_shape: the index shape; required for ``"trainable"`` (it fixes the table size) and used
            as the default ``max_resolution`` for ``"fourier"``.
        num_bands, max_resolution, concat_pos, sine_only: Fourier options (DeepMind layout).
        num_channels, init_scale: trainable table width and init std.
        project_pos_dim: if > 0, project the features to this width with a ``Linear``.
    """
    if kind == "none":
        return None
    if kind == "fourier":
        if max_resolution is None:
            if index_shape is None:
                raise ValueError("fourier position encoding needs max_resolution or index_shape")
            max_resolution = index_shape
        enc: nn.Module = FourierPositionEncoding(
            num_dims, num_bands, tuple(max_resolution), layout="deepmind", concat_pos=concat_pos, sine_only=sine_only
        )
    elif kind == "trainable":
        if index_shape is None:
            raise ValueError("trainable position encoding needs index_shape (it fixes the number of positions)")
        if len(index_shape) != num_dims:
            raise ValueError(f"index_shape {tuple(index_shape)} must have {num_dims} axes")
        enc = TrainableGridPositions(index_shape, num_channels, init_scale)
    else:
        raise ValueError(f"position encoding must be 'fourier', 'trainable' or 'none', got {kind!r}")
    if project_pos_dim > 0:
        enc = ProjectedPositions(enc, project_pos_dim)
    return enc
