"""Decoder query builders: what the output queries of a Perceiver IO decoder are made of.

Each builder exposes ``num_channels`` and ``num_queries`` (the full output index size) at
construction and is called as ``builder(batch_size, inputs=..., subsampled_points=...)`` →
``[B, Q, num_channels]``:

* :class:`TrainableQueries` — a learned table (classification, MLM);
* :class:`FourierQueries` — Fourier features of the output grid (audio, video); with
  ``subsampled_points`` (flat indices) the coordinates are ``-1 + 2·idx/N`` per axis, the official
  formula, which differs from the inclusive ``linspace(-1, 1, N)`` grid used without subsampling;
* :class:`InputQueries` — the preprocessed inputs themselves (optical flow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import ContextStream, FourierPositionEncoding, TrainablePositionEncoding
from ..layers.broadcast import per_sample
from ..validation import check_index_range

__all__ = ["FourierQueries", "InputQueries", "TrainableQueries", "subsampled_positions"]


def subsampled_positions(points: Tensor, index_shape: Sequence[int]) -> Tensor:
    """Flat indices ``[Q]`` into ``index_shape`` → coordinates ``-1 + 2·idx/n`` per axis, ``[Q, d]``.

    This is DeepMind's ``BasicDecoder.decoder_query`` rule for subsampled outputs (never reaches +1).
    """
    points = points.reshape(-1).long()
    coords = []
    rest = points
    for n in reversed(index_shape):  # unravel, last axis fastest (row-major)
        coords.append(rest % n)
        rest = torch.div(rest, n, rounding_mode="floor")
    idx = torch.stack(coords[::-1], dim=-1)  # [Q, d]
    # operators, not a tensor constant (a torch.while_loop body, which gathers queries by position, may hold none)
    sizes = torch.stack([torch.full((), n, dtype=torch.float32, device=points.device) for n in index_shape])
    return -1.0 + (2 * idx).to(torch.float32) / sizes


def _check_points(points: Tensor, total: int, name: str = "subsampled_points") -> None:
    if not isinstance(points, Tensor) or points.is_floating_point() or points.dtype == torch.bool:
        got = f"dtype {points.dtype}" if isinstance(points, Tensor) else type(points).__name__
        raise TypeError(f"subsampled_points must be an integer tensor of flat indices, got {got}")
    if points.ndim != 1:
        raise ValueError(f"subsampled_points must be a 1-D tensor of flat indices, got shape {tuple(points.shape)}")
    check_index_range(points, total, name)


@configurable
class TrainableQueries(nn.Module):
    """``num_queries`` learned query vectors ``[num_queries, num_channels]``.

    ``length`` keeps the first ``length`` rows (a sequence shorter than ``num_queries``);
    ``subsampled_points`` selects rows among those (``None`` = all): with both, every point must be
    below ``length``.
    """

    def __init__(self, num_queries: int, num_channels: int, init_scale: float = 0.02) -> None:
        super().__init__()
        self.num_queries, self.num_channels = num_queries, num_channels
        self.table = TrainablePositionEncoding(num_queries, num_channels, init_scale)

    def forward(
        self,
        batch_size: int,
        *,
        inputs: Tensor | None = None,
        subsampled_points: Tensor | None = None,
        length: int | None = None,
        stream: bool = False,
    ) -> Tensor | ContextStream:
        """→ ``[B, Q, num_channels]`` (a broadcast view of the table).

        ``stream=True``: a :class:`~perceivers.layers.ContextStream` of the same queries, whose chunks (or rows by
        position) are looked up when a decoder reads them: subsampled rows are never gathered all at once."""
        table = self.table.embeddings
        if length is not None:
            if not 0 < length <= self.num_queries:
                raise ValueError(f"length must be in [1, {self.num_queries}], got {length}")
            table = table[:length]
        if subsampled_points is not None:
            _check_points(subsampled_points, table.shape[0],
                          "subsampled_points" if length is None else f"subsampled_points (with length={length})")
            subsampled_points = subsampled_points.to(table.device).long()
        if not stream:
            return per_sample(table if subsampled_points is None else table[subsampled_points], batch_size)
        points = subsampled_points

        def chunk(start: int, stop: int) -> Tensor:
            return per_sample(table[start:stop] if points is None else table[points[start:stop]], batch_size)

        def rows(index: Tensor) -> Tensor:
            return per_sample(table.index_select(0, index if points is None else points.index_select(0, index)),
                              batch_size)

        count = table.shape[0] if points is None else points.shape[0]
        return ContextStream(batch_size, count, self.num_channels, chunk, dtype=table.dtype, device=table.device,
                             rows=rows)


@configurable
class FourierQueries(nn.Module):
    """Fourier features of the output grid ``index_shape`` (frequencies from ``max_resolution``)."""

    def __init__(
        self,
        index_shape: Sequence[int],
        num_bands: int,
        max_resolution: Sequence[float] | None = None,
        *,
        concat_pos: bool = True,
        sine_only: bool = False,
    ) -> None:
        super().__init__()
        self.index_shape = tuple(int(n) for n in index_shape)
        max_resolution = self.index_shape if max_resolution is None else tuple(max_resolution)
        self.encoding = FourierPositionEncoding(
            len(self.index_shape), num_bands, max_resolution, layout="deepmind", concat_pos=concat_pos,
            sine_only=sine_only,
        )
        self.num_channels = self.encoding.num_channels
        self.num_queries = math.prod(self.index_shape)

    def forward(
        self, batch_size: int, *, inputs: Tensor | None = None, subsampled_points: Tensor | None = None,
        stream: bool = False,
    ) -> Tensor | ContextStream:
        """→ ``[B, Q, num_channels]``; ``Q = num_queries`` or ``len(subsampled_points)``.

        ``stream=True``: a :class:`~perceivers.layers.ContextStream` of the same queries, whose chunks are
        made when a decoder reads them (from per-axis tables for the whole grid, from their own points
        when subsampled): the features of all the queries never exist at once."""
        device = None if inputs is None else inputs.device
        # (inputs may be a ContextStream: only its device and dtype are read)
        floating = inputs is not None and inputs.dtype is not None and inputs.dtype.is_floating_point
        dtype = inputs.dtype if floating else torch.float32
        if subsampled_points is not None:
            _check_points(subsampled_points, self.num_queries)
            subsampled_points = subsampled_points.to(device)
        count = self.num_queries if subsampled_points is None else subsampled_points.shape[0]

        def rows(start: int, stop: int) -> Tensor:
            if subsampled_points is not None:
                pos = subsampled_positions(subsampled_points[start:stop], self.index_shape)
                feats = self.encoding.encode(pos).to(dtype)
            elif stop - start == count:  # the whole grid: cached
                feats = self.encoding(self.index_shape, device=device, dtype=dtype)
            else:
                feats = self.encoding.grid_rows(self.index_shape, start, stop, device=device, dtype=dtype)
            return feats.expand(batch_size, -1, -1)

        if stream:
            return ContextStream(batch_size, count, self.num_channels, rows, dtype=dtype, device=device,
                                 rows=self._gather(subsampled_points, batch_size, device, dtype))
        return rows(0, count)

    def _gather(self, points: Tensor | None, batch_size: int, device: torch.device | None,
                dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """The queries by position: ``index`` (int64 ``[n]``) → ``[B, n, num_channels]``, the features of those grid
        points (from per-axis tables) or of those subsampled points, never of all of them."""
        if points is None:
            grid = self.encoding.grid_gather(self.index_shape, device=device, dtype=dtype)
            return lambda index: grid(index).expand(batch_size, -1, -1)

        def rows(index: Tensor) -> Tensor:
            pos = subsampled_positions(points.index_select(0, index), self.index_shape)
            return self.encoding.encode(pos).to(dtype).expand(batch_size, -1, -1)

        return rows


@configurable
class InputQueries(nn.Module):
    """Use the preprocessed inputs ``[B, M, num_channels]`` as the queries (one output per input); a
    :class:`~perceivers.layers.ContextStream` of them passes through, for the decoder to read chunk by chunk."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.num_queries = None

    def forward(
        self, batch_size: int, *, inputs: Tensor | None = None, subsampled_points: Tensor | None = None
    ) -> Tensor:
        if inputs is None:
            raise ValueError("InputQueries needs the preprocessed inputs")
        if subsampled_points is not None:
            raise ValueError("InputQueries does not support subsampled_points (as DeepMind's FlowDecoder)")
        if inputs.shape[-1] != self.num_channels:
            raise ValueError(f"inputs must have {self.num_channels} channels, got {inputs.shape[-1]}")
        return inputs
