"""A cross-attention context given chunk by chunk, so that very large inputs never exist whole."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .sizes import sym_max, sym_min

__all__ = ["ContextStream", "GridContext", "auto_chunk_size", "check_chunk_size", "chunk_bounds", "join_chunks",
           "loop_chunk_size", "loop_pays", "loop_rows", "loop_step", "loops", "onnx_export", "onnx_loops"]

# Without autograd, inputs above STREAM_ABOVE elements per sample are streamed by default
# (``chunk_size=None``) in chunks of a quarter of the input, between MIN_CHUNK and DEFAULT_CHUNK
# elements; with autograd (each chunk is then recomputed in the backward pass) only inputs above
# DEFAULT_CHUNK are, in chunks of DEFAULT_CHUNK.
STREAM_ABOVE = 32768
MIN_CHUNK = 32768
DEFAULT_CHUNK = 65536
# Wide contexts (``channels`` given) get chunks of at most CHUNK_VALUES values over the batch (8 MiB
# in float32; 7943 elements of 264 channels per sample at batch 1), but at least MIN_WIDE_CHUNK
# elements: each chunk then stays in the last-level cache and in malloc's reused heap (larger buffers
# are page-faulted in anew for every chunk). For 261 channels this made the streamed forward 1.7×
# faster at 1M inputs than chunks of 65536, and 1.6× at 224² with batch 8 than chunks of 15904.
CHUNK_VALUES = 1 << 21
MIN_WIDE_CHUNK = 512
# On a GPU the chunks are sized for its memory rather than a processor's cache: 128 MiB of float32 context. CHUNK_VALUES
# there made 98 chunks of 512 rows of the official vision model's inputs at batch 16 (a kernel launch each).
CUDA_CHUNK_VALUES = 1 << 25


def check_chunk_size(value: object, name: str = "chunk_size") -> int | None:
    """``value`` if it is a valid chunk size (``None``, 0 or a positive int; a bool is not), else ``TypeError`` /
    ``ValueError`` naming ``name`` and the value."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be None, 0 or a positive int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be None, 0 or a positive int, got {value}")
    return value


def chunk_bounds(length: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the consecutive chunks of at most ``size`` that cover ``range(length)``.

    Counted as ``⌈length / size⌉`` chunks, not stepped through ``range(0, length, size)``: under
    ``torch.compile(dynamic=True)`` a graph then holds for every length with that many chunks (``range`` of a
    symbolic length specialised the graph to that one length, a recompilation per input size).
    """
    for i in range((length + size - 1) // size):
        start = i * size
        yield start, sym_min(start + size, length)


def join_chunks(parts: Iterable[Tensor], length: int) -> Tensor:
    """Consecutive chunks ``[B, n_i, …]`` of axis 1 → ``[B, length, …]``: ``torch.cat`` when autograd records
    (the chunks are its inputs), otherwise each chunk is written into the output as it comes, so that the
    chunks and their concatenation are never alive together."""
    if torch.is_grad_enabled():
        return torch.cat(list(parts), dim=1)
    out, start = None, 0
    for part in parts:
        if out is None:
            out = part.new_empty((part.shape[0], length, *part.shape[2:]))
        out[:, start:start + part.shape[1]] = part
        start += part.shape[1]
    return out


def auto_chunk_size(
    length: int, chunk_size: int | None, *, grad: bool = False, channels: int | None = None, batch: int = 1,
    device: torch.device | None = None,
) -> int:
    """The chunk size to stream ``length`` keys with, or 0 to attend them at once.

    ``chunk_size``: ``None`` chooses (without autograd: inputs longer than 32768 elements, in
    chunks of a quarter of the input clamped to 32768–65536; with autograd, ``grad=True``: inputs
    longer than 65536, in chunks of 65536; with ``channels``, chunks hold at most ``2**21 //
    (batch · channels)`` elements, and at least 512; on a CUDA ``device``, ``2**25 // (batch · channels)``);
    ``0`` never streams; a positive value streams in chunks of that size whenever ``length`` exceeds it.

    Symbolic sizes (``torch.export`` with dynamic shapes) set no guard: a symbolic ``length`` is never
    streamed in a Python loop (``None``, and any ``chunk_size`` while exporting: :func:`loops` says where a
    ``torch.while_loop`` streams it instead), and a symbolic ``batch`` sizes the chunks as for one sample.
    """
    if not isinstance(batch, int):
        batch = 1
    if not isinstance(length, int) and (chunk_size is None or torch.compiler.is_exporting()):
        return 0  # torch.export loops over a symbolic length instead (see loops)
    if chunk_size is None:
        if grad:
            size = DEFAULT_CHUNK if length > DEFAULT_CHUNK else 0
        elif length <= STREAM_ABOVE:
            size = 0
        else:
            size = min(DEFAULT_CHUNK, max(MIN_CHUNK, -(-length // 4)))
        if size and channels:
            values = CUDA_CHUNK_VALUES if device is not None and device.type == "cuda" else CHUNK_VALUES
            size = min(size, max(MIN_WIDE_CHUNK, values // (max(batch, 1) * channels)))
        return size
    check_chunk_size(chunk_size)
    return chunk_size if 0 < chunk_size < length else 0


def loops(length: int, chunk_size: int | None, *, grad: bool = False) -> bool:
    """Whether a context of symbolic ``length`` (``torch.export`` with dynamic sizes) is attended in a
    ``torch.while_loop`` over chunks (:meth:`~perceivers.layers.Attention.forward_looped`), so that the exported
    program's memory does not grow with the input as eager mode's streaming does not: while exporting, without
    autograd, unless ``chunk_size`` is 0. ``torch.compile`` keeps attending a symbolic length at once."""
    return (not isinstance(length, int) and chunk_size != 0 and not grad and torch.compiler.is_exporting())


def onnx_loops() -> bool:
    """Whether a streamed context of a fixed length is attended in one ``torch.while_loop`` too (an ONNX ``Loop``),
    as a symbolic length is (:func:`loops`): while exporting to ONNX (``torch.onnx.export``, or a ``torch.export``
    inside :func:`onnx_export` whose program is converted afterwards). Unrolled into a chain of chunks, the graph let
    onnxruntime compute every chunk's scores before the online softmax consumed the first (its order runs
    independent nodes early): the README Perceiver at 512² held 8 × 32 MiB of scores at once, 330 MiB in all."""
    return torch.onnx.is_in_onnx_export() or (_onnx_export and torch.compiler.is_exporting())


_onnx_export = False  # see onnx_export


@contextmanager
def onnx_export() -> Iterator[None]:
    """While open, ``torch.export`` writes programs for ONNX: streamed attention over a fixed-length context as one
    loop (:func:`onnx_loops`), as ``torch.onnx.export(model, dynamo=True)`` does by itself. For a program exported
    first and converted with ``torch.onnx.export(program)`` (``perceivers export`` does so for ``.onnx`` files)."""
    global _onnx_export
    before, _onnx_export = _onnx_export, True
    try:
        yield
    finally:
        _onnx_export = before


def loop_chunk_size(chunk_size: int | None, channels: int) -> int:
    """The rows per step of :func:`loop_rows` (and of a looped stream's gathers) for rows whose widest intermediate
    has ``channels`` values: ``chunk_size`` if given, else at most ``CHUNK_VALUES // channels`` rows (at least 512,
    at most 65536), the rule :func:`auto_chunk_size` applies to wide rows of one sample."""
    if chunk_size:
        return chunk_size
    return min(DEFAULT_CHUNK, max(MIN_WIDE_CHUNK, CHUNK_VALUES // max(channels, 1)))


def loop_pays(out_width: int | None, hidden_width: int, *, in_place: bool) -> bool:
    """Whether :func:`loop_rows` holds less than making every row at once, for rows ``out_width`` wide (``None``:
    narrow, e.g. a row-wise head's) whose widest intermediate (or attention scores) per row has ``hidden_width``
    values: always ``in_place``; otherwise, where the loop holds the output twice, when the rows are at most half
    as wide (256 logits of 262144 PerceiverIO queries, 256 scores a query: a ``.pt2`` program held 587 MiB looped,
    334 MiB at once)."""
    return in_place or out_width is None or 2 * out_width <= hidden_width


def loop_step(chunk_size: int, length: int) -> int:
    """Rows per step of a loop over ``length`` rows (possibly symbolic): ``min(chunk_size, length)``, but at least 2
    (a length of 1 repeats its row): a step of ``min(chunk_size, length)`` rows left guards such as ``B·n ≠ B``
    (a Linear's ``[B·n, C]`` view) that a length of 1 fails."""
    return 2 + sym_min(max(chunk_size, 2) - 2, sym_max(length - 2, 0))


def loop_rows(fn: Callable[[Tensor], Tensor], length: int, chunk_size: int, *, device: torch.device | None = None,
              in_place: bool = False) -> Tensor:
    """``[B, length, …]`` whose rows at the positions ``index`` are ``fn(index)`` (int64 ``[n]`` → ``[B, n, …]``,
    each row computed from its own position only), made at most ``chunk_size`` rows at a time in a loop: a symbolic
    ``length`` (``torch.export`` with dynamic sizes, see :func:`loops`) holds one chunk's intermediates at a time, as
    eager mode's chunked decoding does.

    The portable loop is a ``scan`` (an ONNX ``Scan``) over ``S = max(⌈length / chunk_size⌉, 2)`` chunks of
    ``⌈length / S⌉`` rows (at least 2, see :func:`loop_step`; the last chunk repeats the last row where the rows do
    not divide evenly): each step's rows go into the stacked output, which one gather puts in order (a
    ``torch.while_loop`` writing each chunk with ``index_copy`` copied the whole output every step, ONNX's
    ``ScatterND``: 16 logits of 262144 PerceiverIO queries took 0.58 s in onnxruntime, now 0.22). The loop holds
    the output twice (the stacked steps, then the rows in order). ``in_place`` (a ``.pt2``-only program, see
    :func:`~perceivers.layers.attention.fused_export`) writes each chunk into one output in a ``torch.while_loop``
    instead, which ``torch.export`` records as a mutation the ONNX conversion refuses; its last chunk is shifted back
    to end at ``length``. A program with the scan exported without autograd (as ``perceivers export`` does) converts to
    ONNX under ``torch.no_grad()`` only (torch's conversion otherwise retraces it through scan's autograd rule, which
    fails on the symbolic sizes); ``torch.onnx.export(model, dynamo=True)`` with autograd on converts as it is.
    """
    if not in_place:
        return _scan_rows(fn, length, chunk_size, device)
    from torch._higher_order_ops.while_loop import while_loop

    size = loop_step(chunk_size, length)
    offsets = torch.arange(size, device=device)

    def index_at(i: Tensor) -> Tensor:
        start = (i * size).clamp(max=length - size).clamp(min=0)
        return (start + offsets).clamp(max=length - 1)

    first_index = offsets.clamp(max=length - 1)
    first = fn(first_index)  # [B, n, …]: the output's trailing shape and dtype
    out = first.new_zeros((first.shape[0], length, *first.shape[2:]))
    zero = torch.zeros((), dtype=torch.long, device=first.device)

    # the first chunk too: outside a loop, torch.export would record a copy of the output for its write
    def write_first(i: Tensor) -> tuple[Tensor]:
        out.index_copy_(1, first_index, first)
        return (i + 1,)

    def write(i: Tensor) -> tuple[Tensor]:
        index = index_at(i)
        out.index_copy_(1, index, fn(index))
        return (i + 1,)

    while_loop(lambda i: i < 1, write_first, (zero,))
    while_loop(lambda i: i * size < length, write, (zero + 1,))
    return out


def _scan_rows(fn: Callable[[Tensor], Tensor], length: int, chunk_size: int, device: torch.device | None) -> Tensor:
    """:func:`loop_rows`' portable loop: a ``scan`` over the chunks' positions ``[S, n]``."""
    from torch._higher_order_ops.scan import scan

    # at least 2 steps and 2 rows a step: one step (or one row) left guards the length cannot meet for every size.
    # ceiling divisions of positive sizes: ONNX rounds a symbolic quotient toward zero (-(-a // b) became ⌊a / b⌋)
    chunk = max(chunk_size, 2)
    steps = sym_max((length + chunk - 1) // chunk, 2)
    size = 2 + sym_max((length + steps - 1) // steps - 2, 0)
    positions = torch.arange(steps * size, device=device).clamp(max=length - 1).view(steps, size)

    def step(carry: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return carry.clone(), fn(index).transpose(0, 1)  # [n, B, …]: the steps stack into rows of one sample

    # scan requires a carry: a scalar that nothing reads
    rows = scan(step, torch.zeros((), device=device), positions)[1].flatten(0, 1)  # [S·n, B, …]
    # in order and without the repeated rows: one copy (a slice would guard S·n ≥ length, which sympy cannot show)
    return rows.movedim(0, 1).index_select(1, torch.arange(length, device=device))


@dataclass
class GridContext:
    """A context ``[B, H·W, D + C_pos]`` on a 2-D grid, given by its parts instead of its rows.

    ``data [B, H, W, D]`` (any strides, e.g. a channels-last view of an image), ``shape = (H, W)`` and ``tables = (T_h [H, C_pos],
    T_w [W, C_pos])`` float32 with disjoint non-zero channels: pixel ``(i, j)`` is
    ``[data, T_h[i] + T_w[j]]`` (see :meth:`FourierPositionEncoding.axis_tables`). Lets
    :mod:`perceivers.layers.grid_attention` score the position features per axis.
    """

    data: Tensor
    shape: tuple[int, int]
    tables: tuple[Tensor, Tensor]

    @property
    def channels(self) -> int:
        """``D + C_pos``."""
        return self.data.shape[-1] + self.tables[0].shape[-1]


@dataclass
class ContextStream:
    """The context ``[batch, length, channels]`` of a cross-attention, produced on demand.

    ``chunk(start, stop)`` returns rows ``start:stop`` (``[batch, stop - start, channels]``); the
    model builds them from its input, e.g. pixels plus the Fourier features of those positions only.
    ``dtype`` and ``device`` describe the chunks (``None``: unknown), so that a stream can stand in
    for the tensor wherever only its shape, dtype and device are read. ``grid`` optionally describes
    the same context by its parts (:class:`GridContext`), for attention that can use that structure.
    ``rows(index)`` optionally returns the rows at the positions ``index`` (int64 ``[n]``): ``[batch, n,
    channels]``; a stream of symbolic ``length`` needs it (see :func:`loops`).
    """

    batch: int
    length: int
    channels: int
    chunk: Callable[[int, int], Tensor]
    chunk_size: int = DEFAULT_CHUNK
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    grid: GridContext | None = None
    rows: Callable[[Tensor], Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(batch, length, channels)``, as the whole context's ``shape``."""
        return (self.batch, self.length, self.channels)

    @classmethod
    def from_tensor(cls, context: Tensor, chunk_size: int = DEFAULT_CHUNK) -> ContextStream:
        """Stream an existing ``[B, M, C]`` tensor (saves the keys, values and scores of all of it)."""
        return cls(context.shape[0], context.shape[1], context.shape[2],
                   lambda a, b: context[:, a:b], chunk_size, context.dtype, context.device,
                   rows=lambda index: context.index_select(1, index))

    def materialize(self) -> Tensor:
        """The whole context (for tests and small inputs)."""
        return self.chunk(0, self.length)
