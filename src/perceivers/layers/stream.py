"""A cross-attention context given chunk by chunk, so that very large inputs never exist whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["ContextStream", "auto_chunk_size"]

# Without autograd, inputs above STREAM_ABOVE elements per sample are streamed by default
# (``chunk_size=None``) in chunks of a quarter of the input, between MIN_CHUNK and DEFAULT_CHUNK
# elements; with autograd (each chunk is then recomputed in the backward pass) only inputs above
# DEFAULT_CHUNK are, in chunks of DEFAULT_CHUNK.
STREAM_ABOVE = 32768
MIN_CHUNK = 32768
DEFAULT_CHUNK = 65536


def auto_chunk_size(length: int, chunk_size: int | None, *, grad: bool = False) -> int:
    """The chunk size to stream ``length`` keys with, or 0 to attend them at once.

    ``chunk_size``: ``None`` chooses (without autograd: inputs longer than 32768 elements, in
    chunks of a quarter of the input clamped to 32768–65536; with autograd, ``grad=True``: inputs
    longer than 65536, in chunks of 65536); ``0`` never streams; a positive value streams in
    chunks of that size whenever ``length`` exceeds it.
    """
    if chunk_size is None:
        if grad:
            return DEFAULT_CHUNK if length > DEFAULT_CHUNK else 0
        if length <= STREAM_ABOVE:
            return 0
        quarter = -(-length // 4)
        return min(DEFAULT_CHUNK, max(MIN_CHUNK, quarter))
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be None, 0 or positive, got {chunk_size}")
    return chunk_size if 0 < chunk_size < length else 0


@dataclass
class ContextStream:
    """The context ``[batch, length, channels]`` of a cross-attention, produced on demand.

    ``chunk(start, stop)`` returns rows ``start:stop`` (``[batch, stop - start, channels]``); the
    model builds them from its input, e.g. pixels plus the Fourier features of those positions only.
    """

    batch: int
    length: int
    channels: int
    chunk: Callable[[int, int], Tensor]
    chunk_size: int = DEFAULT_CHUNK

    @classmethod
    def from_tensor(cls, context: Tensor, chunk_size: int = DEFAULT_CHUNK) -> ContextStream:
        """Stream an existing ``[B, M, C]`` tensor (saves the keys, values and scores of all of it)."""
        return cls(context.shape[0], context.shape[1], context.shape[2],
                   lambda a, b: context[:, a:b], chunk_size)

    def materialize(self) -> Tensor:
        """The whole context (for tests and small inputs)."""
        return self.chunk(0, self.length)
