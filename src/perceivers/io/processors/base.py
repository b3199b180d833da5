"""What every preprocessor returns, and the helpers shared by the modality processors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ...layers import ContextStream

__all__ = ["Preprocessed", "add_positions", "check_pos_mode", "concat_rows", "padder", "restructure"]


class Preprocessed(NamedTuple):
    """Output of a preprocessor (DeepMind's triple).

    Attributes:
        inputs: ``[B, M, C]`` network inputs (features with positions), or the same as a
            :class:`~perceivers.layers.ContextStream` when a preprocessor was asked to stream them.
        modality_sizes: tokens per modality (multimodal only), else ``None``.
        inputs_without_pos: the features before positions were added (a dict for multimodal;
            ``None`` when streamed).
    """

    inputs: Tensor | ContextStream
    modality_sizes: dict[str, int] | None
    inputs_without_pos: Any


def check_pos_mode(mode: str, features: int, encoding: nn.Module | None) -> int:
    """Raise a ValueError unless ``mode`` (``concat_or_add_pos``) is ``"concat"`` or ``"add"`` and, for
    ``"add"``, ``encoding`` (if any) is ``features`` wide; → the width of the tokens (features, plus the
    position channels when concatenated)."""
    if mode not in ("concat", "add"):
        raise ValueError(f"concat_or_add_pos must be 'concat' or 'add', got {mode!r}")
    pos_channels = 0 if encoding is None else encoding.num_channels
    if mode == "add" and encoding is not None and pos_channels != features:
        raise ValueError(f"concat_or_add_pos='add' needs position channels {pos_channels} == features {features}")
    return features + pos_channels if mode == "concat" else features


def add_positions(features: Tensor, index_shape: tuple[int, ...], encoding: nn.Module | None, mode: str) -> Tensor:
    """Flattened ``features [B, N, C]`` plus position features of ``index_shape``, concatenated or added."""
    if encoding is None:
        return features
    pos = encoding(index_shape, device=features.device, dtype=features.dtype)  # [N, Cp]
    pos = pos.expand(features.shape[0], -1, -1)
    if mode == "concat":
        return torch.cat([features, pos], dim=-1)
    if mode == "add":
        if pos.shape[-1] != features.shape[-1]:
            raise ValueError(
                f"concat_or_add_pos='add' needs equal widths, got features {features.shape[-1]} and "
                f"positions {pos.shape[-1]}"
            )
        return features + pos
    raise ValueError(f"concat_or_add_pos must be 'concat' or 'add', got {mode!r}")


def restructure(modality_sizes: Mapping[str, int], inputs: Tensor) -> dict[str, Tensor]:
    """Split ``inputs [B, ΣM, C]`` into per-modality slices, modalities in sorted order."""
    total = sum(modality_sizes.values())
    if inputs.shape[1] != total:
        raise ValueError(f"expected {total} rows for modality sizes {dict(modality_sizes)}, got {inputs.shape[1]}")
    out, start = {}, 0
    for name in sorted(modality_sizes):
        out[name] = inputs[:, start : start + modality_sizes[name]]
        start += modality_sizes[name]
    return out


RowMap = Callable[[Tensor, int, int], Tensor]  # rows a:b of a part [B, b - a, C_i] → [B, b - a, C]


def concat_rows(parts: Sequence[tuple[Tensor | ContextStream, RowMap]], channels: int,
                chunk_size: int | None = None) -> Tensor | ContextStream:
    """Parts ``[B, M_i, C_i]`` (tensors or streams), each mapped row-wise by its function (called with
    the rows ``a:b`` and ``a, b``) to ``channels``, concatenated along the rows: a tensor when no part
    streams, else a :class:`~perceivers.layers.ContextStream` whose chunks map only the rows they cover
    (a multimodal input's or query set's padded modalities)."""
    if not any(isinstance(x, ContextStream) for x, _ in parts):
        return torch.cat([fn(x, 0, x.shape[1]) for x, fn in parts], dim=1)
    bounds = [0]
    for x, _ in parts:
        bounds.append(bounds[-1] + x.shape[1])

    def chunk(start: int, stop: int) -> Tensor:
        pieces = []
        for (x, fn), lo, hi in zip(parts, bounds, bounds[1:]):
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            if a < b:
                pieces.append(fn(x.chunk(a, b) if isinstance(x, ContextStream) else x[:, a:b], a, b))
        return torch.cat(pieces, dim=1)

    first = next(x for x, _ in parts if isinstance(x, ContextStream))
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    return ContextStream(first.batch, bounds[-1], channels, chunk, dtype=first.dtype, device=first.device, **kw)


def padder(padding: nn.Module) -> RowMap:
    """The row map that appends a learned padding vector (``padding.embeddings [1, C_pad]``) to every row."""

    def pad(x: Tensor, a: int, b: int) -> Tensor:
        return torch.cat([x, padding.embeddings.to(x.dtype).expand(x.shape[0], x.shape[1], -1)], dim=-1)

    return pad
