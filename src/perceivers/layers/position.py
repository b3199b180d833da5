"""Position encodings: Fourier features in both published layouts, and trainable tables.

Both layouts use the band frequencies ``linspace(1, max_resolution / 2, num_bands)`` per axis (or,
with ``freq_base``, the log-spaced bands of perceiver-pytorch before 0.7.3 and the multi-modality fork)
and positions in ``[-1, 1]``; they differ in channel order:

* ``"lucidrains"`` (perceiver-pytorch): per axis ``[sin(π x f_1..K), cos(π x f_1..K), x]``, axis-major,
  so ``d · (2K + 1)`` channels.
* ``"deepmind"`` (official code, transformers): ``[x_1..d, sin(all axes and bands), cos(all axes and
  bands)]`` with the bands of one axis contiguous; ``d · (2K + 1)`` channels with ``concat_pos``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ..configurable import configurable
from .broadcast import per_sample
from .sizes import sym_max

__all__ = [
    "FourierPositionEncoding",
    "TrainablePositionEncoding",
    "axis_coordinates",
    "band_frequencies",
    "fourier_features",
    "linear_positions",
]

Layout = Literal["lucidrains", "deepmind"]


def linear_positions(
    index_shape: Sequence[int], *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Grid coordinates ``linspace(-1, 1, n)`` per axis (both ends included), ``[*index_shape, d]``."""
    axes = [axis_coordinates(n, device=device, dtype=dtype) for n in index_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def axis_coordinates(
    n: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32, length: int | None = None
) -> Tensor:
    """``linspace(-1, 1, n)`` ``[n]``; for a size that may be symbolic (``torch.export`` or ``torch.compile``
    with dynamic image sizes, where ``torch.linspace`` would fix its length) the same values from
    ``arange``, within an ulp of ``torch.linspace``'s (which rounds its vectorised blocks differently).

    ``length`` (≥ ``n``): ``[length]`` instead, the first ``n`` values those; for a symbolic ``n`` derived from
    another size (``⌈H / 2⌉`` tokens of ``H`` pixels) to index into, as a tensor of ``n`` elements would make
    ``torch.export`` guard ``n ≠ 1`` (it cannot see that ``⌈H / 2⌉ > 1``)."""
    if length is None and not _maybe_symbolic(n):
        return torch.linspace(-1.0, 1.0, steps=n, device=device, dtype=dtype)
    i = torch.arange(n if length is None else length, device=device, dtype=dtype)
    step = 2.0 / sym_max(n - 1, 1)
    # from both ends, as torch.linspace does: -1 and 1 exact, the grid symmetric
    return torch.where(i < sym_max(n // 2, 1), -1.0 + step * i, 1.0 - step * (n - 1 - i))


def band_frequencies(
    num_bands: int, max_resolution: float, freq_base: float | None = None, *,
    device: torch.device | None = None, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``K`` band frequencies of one axis ``[K]``.

    ``linspace(1, r / 2, K)``; with ``freq_base`` b, ``b ** linspace(1, log_b(r / 2), K)`` (log-spaced, the
    lowest band is b: perceiver-pytorch before 0.7.3 and the multi-modality fork).
    """
    if freq_base is None:
        return torch.linspace(1.0, max_resolution / 2, steps=num_bands, device=device, dtype=dtype)
    if freq_base <= 0 or freq_base == 1:
        raise ValueError(f"freq_base must be a positive number other than 1, got {freq_base}")
    top = math.log(max_resolution / 2) / math.log(freq_base)
    return torch.logspace(1.0, top, num_bands, base=freq_base, device=device, dtype=dtype)


def fourier_features(
    pos: Tensor,
    num_bands: int,
    max_resolution: float | Sequence[float],
    *,
    layout: Layout = "deepmind",
    concat_pos: bool = True,
    sine_only: bool = False,
    freq_base: float | None = None,
) -> Tensor:
    """Fourier features of coordinates ``pos [..., d]`` → ``[..., C]``.

    Args:
        num_bands: K, bands per axis.
        max_resolution: one value or one per axis; bands run ``linspace(1, r / 2, K)``.
        layout: ``"deepmind"`` or ``"lucidrains"`` (see the module docstring).
        concat_pos: include the raw coordinates.
        sine_only: sines only (DeepMind layout only).
        freq_base: log-spaced bands instead (see :func:`band_frequencies`).

    Returns ``pos.dtype``; computed in float32 at least (float64 for float64), so bfloat16 / float16
    coordinates get their features rounded once instead of sines of arguments rounded to 8 or 11 bits.
    """
    out_dtype = pos.dtype
    pos = pos.to(_feature_dtype(pos.dtype))
    d = pos.shape[-1]
    res = [float(max_resolution)] * d if isinstance(max_resolution, (int, float)) else list(map(float, max_resolution))
    if len(res) != d:
        raise ValueError(f"max_resolution has {len(res)} entries but positions have {d} axes")
    freqs = torch.stack(
        [band_frequencies(num_bands, r, freq_base, device=pos.device, dtype=pos.dtype) for r in res]
    )  # [d, K]
    scaled = pos[..., None] * freqs * math.pi  # [..., d, K]
    if layout == "lucidrains":
        if sine_only:
            raise ValueError("sine_only is only defined for the 'deepmind' layout")
        parts = [scaled.sin(), scaled.cos()] + ([pos[..., None]] if concat_pos else [])
        return torch.cat(parts, dim=-1).flatten(-2).to(out_dtype)
    if layout != "deepmind":
        raise ValueError(f"layout must be 'deepmind' or 'lucidrains', got {layout!r}")
    scaled = scaled.flatten(-2)  # [..., d*K], bands of one axis contiguous
    parts = ([pos] if concat_pos else []) + [scaled.sin()] + ([] if sine_only else [scaled.cos()])
    return torch.cat(parts, dim=-1).to(out_dtype)


def _maybe_symbolic(n: int) -> bool:
    """Whether size ``n`` may be symbolic: a ``SymInt`` (``torch.export``), or any size while Dynamo traces
    (it presents symbolic sizes as ints)."""
    return isinstance(n, torch.SymInt) or torch.compiler.is_dynamo_compiling()


def _sizes(index_shape: Sequence[int]) -> tuple[int, ...]:
    """``index_shape`` as a tuple of ints; sizes that may be symbolic stay as they are instead of being
    specialised to the traced ones."""
    return tuple(n if _maybe_symbolic(n) else int(n) for n in index_shape)


def _feature_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision Fourier features are computed in for a model of ``dtype``: float64 for float64, float32
    otherwise (bf16/fp16 models get float32 features rounded once)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@configurable
class FourierPositionEncoding(nn.Module):
    """Fourier position features for a grid or for arbitrary coordinates, with a per-shape cache.

    Args:
        num_dims: d, number of position axes.
        num_bands: K, bands per axis.
        max_resolution: ``max_freq`` of perceiver-pytorch, or DeepMind's per-axis ``max_resolution``.
        layout, concat_pos, sine_only, freq_base: as :func:`fourier_features`.
    """

    def __init__(
        self,
        num_dims: int,
        num_bands: int,
        max_resolution: float | Sequence[float],
        *,
        layout: Layout = "deepmind",
        concat_pos: bool = True,
        sine_only: bool = False,
        freq_base: float | None = None,
        cache_size: int = 8,
    ) -> None:
        super().__init__()
        if isinstance(max_resolution, (int, float)):
            max_resolution = (float(max_resolution),) * num_dims
        if len(max_resolution) != num_dims:
            raise ValueError(f"max_resolution needs {num_dims} entries, got {tuple(max_resolution)}")
        self.num_dims, self.num_bands = num_dims, num_bands
        self.max_resolution = tuple(float(r) for r in max_resolution)
        self.layout, self.concat_pos, self.sine_only = layout, concat_pos, sine_only
        self.freq_base = None if freq_base is None else float(freq_base)
        band_frequencies(num_bands, self.max_resolution[0], self.freq_base)  # a bad freq_base fails here
        self.num_channels = num_dims * (num_bands * (1 if sine_only else 2) + int(concat_pos))
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()
        self._cache_size = cache_size

    def __getstate__(self) -> dict:
        # the cache is derived data: a pickled, saved (torch.save(model)) or deep-copied module starts without it
        # (GatedPerceiver after a 512² forward: 27 MB of cached features in a 0.07 MB checkpoint)
        state = super().__getstate__()
        state["_cache"] = OrderedDict()
        return state

    def encode(self, pos: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Features of coordinates ``pos [..., num_dims]`` (e.g. per-sample point clouds) → ``[..., C]`` in
        ``dtype`` (default ``pos.dtype``), computed from the coordinates as given in float32 at least (float64
        for float64) and rounded once."""
        if pos.shape[-1] != self.num_dims:
            raise ValueError(f"positions must have {self.num_dims} coordinates in the last axis, got {pos.shape[-1]}")
        out = pos.dtype if dtype is None else dtype
        return fourier_features(
            pos.to(_feature_dtype(out)), self.num_bands, self.max_resolution, layout=self.layout,
            concat_pos=self.concat_pos, sine_only=self.sine_only, freq_base=self.freq_base,
        ).to(out)

    def forward(
        self, index_shape: Sequence[int], *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Features of the ``linspace(-1, 1)`` grid of ``index_shape`` → ``[prod(index_shape), C]``.

        Computed in float32 (float64 for ``dtype=float64``) and cast to ``dtype``; cached per shape, device
        and dtype.
        """
        index_shape = _sizes(index_shape)
        if len(index_shape) != self.num_dims:
            raise ValueError(f"expected {self.num_dims} index axes, got shape {index_shape}")
        if torch.compiler.is_compiling():  # a traced graph computes them (constant-folded by the compiler)
            return self._compute(index_shape, device, dtype)
        key = (index_shape, str(device), dtype, torch.is_inference_mode_enabled())
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        feats = self._compute(index_shape, device, dtype)
        self._cache[key] = feats
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return feats

    def _compute(self, index_shape: tuple[int, ...], device, dtype: torch.dtype) -> Tensor:
        pos = linear_positions(index_shape, device=device, dtype=_feature_dtype(dtype))
        return self.encode(pos.reshape(-1, self.num_dims)).to(dtype)

    def grid_rows(
        self,
        index_shape: Sequence[int],
        start: int,
        stop: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        out: Tensor | None = None,
    ) -> Tensor:
        """Rows ``start:stop`` of ``forward(index_shape)`` ``[stop - start, C]``, without the others.

        Used to stream very large grids. The features of a grid point are a per-axis table lookup
        (every channel depends on one axis only), so a chunk is assembled from ``n_d × C_d`` tables
        computed once per shape, with the same numbers as ``forward``, never the whole array.
        ``out`` (``[..., stop - start, C]``, e.g. the position channels of a chunk being assembled,
        not requiring grad) receives the rows, broadcast over its leading axes, and is returned.
        """
        index_shape = _sizes(index_shape)
        if len(index_shape) != self.num_dims:
            raise ValueError(f"expected {self.num_dims} index axes, got shape {index_shape}")
        tables = self.axis_tables(index_shape, device, _feature_dtype(dtype if out is None else out.dtype))
        if len(index_shape) == 2 and start % index_shape[1] == 0 and stop % index_shape[1] == 0:
            # whole rows of an image: one broadcast sum of the two axis tables
            w = index_shape[1]
            rows_h, rows_w = tables[0][start // w: stop // w, None, :], tables[1][None, :, :]
            if out is not None:
                grid = out.unflatten(-2, (stop // w - start // w, w))  # [..., rows, w, C]
                torch.add(rows_h.expand_as(grid), rows_w.expand_as(grid), out=grid)
                return out
            return (rows_h + rows_w).reshape(-1, self.num_channels).to(dtype)
        feats = self._points(tables, index_shape, torch.arange(start, stop, device=device), stop)
        if out is not None:
            return out.copy_(feats)
        return feats.to(dtype)

    def grid_gather(self, index_shape: Sequence[int], *, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32, lengths: Sequence[int] | None = None,
                    ) -> Callable[[Tensor], Tensor]:
        """A function: flat row-major positions ``index`` (int64 ``[n]``) in ``index_shape`` → those rows of
        ``forward(index_shape)`` ``[n, C]``, gathered from the per-axis tables (computed here, once), never the
        whole array. Sizes may be symbolic: streamed attention in a ``torch.export`` program with dynamic
        sizes builds its chunks so, inside a ``torch.while_loop`` (whose body must create no tensor constant).
        ``lengths``: the tables' lengths (see :meth:`axis_tables`).
        """
        index_shape = _sizes(index_shape)
        if len(index_shape) != self.num_dims:
            raise ValueError(f"expected {self.num_dims} index axes, got shape {index_shape}")
        tables = self.axis_tables(index_shape, device, _feature_dtype(dtype), lengths=lengths)
        return lambda index: self._points(tables, index_shape, index, None).to(dtype)

    @staticmethod
    def _points(tables: list[Tensor], index_shape: tuple, flat: Tensor, stop: int | None) -> Tensor:
        """``Σ_a tables[a][i_a]`` for the flat positions ``flat`` (``stop``: their bound, ``None``: unknown)."""
        feats = None
        stride = 1
        for table, n in zip(reversed(tables), reversed(index_shape)):
            # the last axis by the flat position itself (no `stride == 1` test: a symbolic stride would be guarded)
            idx = flat if feats is None else torch.div(flat, stride, rounding_mode="floor")
            if stop is None:  # a symbolic n: the ONNX exporter's remainder takes no symbolic divisor
                idx = idx - torch.div(idx, n, rounding_mode="floor") * n
            elif stride * n < stop:
                idx = torch.remainder(idx, n)
            rows = table.index_select(0, idx)
            feats = rows if feats is None else feats + rows  # disjoint channels: exact
            stride *= n
        return feats

    def axis_tables(self, index_shape: Sequence[int], device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32, *, lengths: Sequence[int] | None = None) -> list[Tensor]:
        """Per axis ``[n_d, C]`` (float32, or ``dtype`` float64): that axis's channels in their final places,
        zeros elsewhere.

        The features of grid point ``(i_1, …, i_d)`` are ``Σ_a tables[a][i_a]`` (disjoint channels, so
        the sum is exact); cached per shape, device and dtype. ``lengths`` (each ≥ ``n_d``): tables of
        ``[lengths[d], C]`` rows, the first ``n_d`` those, the others never to be read: for sizes derived from
        others in an exported program (:func:`axis_coordinates`' ``length``).
        """
        index_shape = _sizes(index_shape)
        lengths = (None,) * len(index_shape) if lengths is None else _sizes(lengths)
        dtype = _feature_dtype(dtype)
        compiling = torch.compiler.is_compiling()
        key = None if compiling else ("axis_tables", index_shape, lengths, str(device), dtype,
                                      torch.is_inference_mode_enabled())
        cached = None if compiling else self._cache.get(key)
        if cached is not None:
            return cached
        k, d = self.num_bands, self.num_dims
        per_axis = int(self.concat_pos) + k * (1 if self.sine_only else 2)
        tables = []
        for a, (n, length, res) in enumerate(zip(index_shape, lengths, self.max_resolution)):
            pos = axis_coordinates(n, device=device, dtype=dtype, length=length)[:, None]
            own = fourier_features(pos, self.num_bands, res, layout=self.layout, concat_pos=self.concat_pos,
                                   sine_only=self.sine_only, freq_base=self.freq_base)  # [n, per_axis]
            if self.layout == "lucidrains":  # axis-major: [sin K, cos K, x] per axis
                cols = list(range(a * per_axis, (a + 1) * per_axis))
            else:  # [x of every axis, sines of every axis, cosines of every axis]; own = [x?, sin K, cos K?]
                cols = [a] if self.concat_pos else []
                base = d if self.concat_pos else 0
                for group in range(1 if self.sine_only else 2):
                    cols += [base + group * d * k + a * k + j for j in range(k)]
            table = torch.zeros(pos.shape[0], self.num_channels, device=device, dtype=dtype)
            table[:, cols] = own
            tables.append(table)
        if key is not None:
            self._cache[key] = tables
        return tables

    def extra_repr(self) -> str:
        return (
            f"num_dims={self.num_dims}, num_bands={self.num_bands}, max_resolution={self.max_resolution}, "
            f"layout={self.layout!r}, num_channels={self.num_channels}"
            + ("" if self.freq_base is None else f", freq_base={self.freq_base}")
        )


class TrainablePositionEncoding(nn.Module):
    """A learned table ``[index_dim, num_channels]``, truncated-normal initialised (std ``init_scale``)."""

    def __init__(self, index_dim: int, num_channels: int, init_scale: float = 0.02) -> None:
        super().__init__()
        self.index_dim, self.num_channels = index_dim, num_channels
        self.embeddings = nn.Parameter(torch.empty(index_dim, num_channels))
        nn.init.trunc_normal_(self.embeddings, std=init_scale, a=-2 * init_scale, b=2 * init_scale)

    def forward(self, batch_size: int | None = None) -> Tensor:
        """``[index_dim, C]``, or ``[batch_size, index_dim, C]`` (a broadcast view) when given."""
        if batch_size is None:
            return self.embeddings
        return per_sample(self.embeddings, batch_size)
