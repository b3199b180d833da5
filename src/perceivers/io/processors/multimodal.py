"""Several modalities in one input array, and the matching split of the decoder output."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ...configurable import configurable
from ...layers import ContextStream, TrainablePositionEncoding
from .base import Preprocessed, RowMap, concat_rows, padder, restructure
from .postprocessors import rowwise_parts

__all__ = ["MultimodalPostprocessor", "MultimodalPreprocessor"]


@configurable
class MultimodalPreprocessor(nn.Module):
    """Preprocess each modality, pad all to one width with learned vectors, mask, concatenate (sorted).

    Args:
        modalities: name → preprocessor (each exposes ``num_channels``).
        mask_probs: name → probability that a token of that modality is replaced by the modality's
            learned mask token; ``None`` for no masking (and no mask-token parameters). Applied in
            train *and* eval mode, as the official code does (the multimodal checkpoint uses 0 for
            image/audio and 1 for the label, which is deterministic).
        min_padding_size: every modality gets at least this many learned padding channels.

    Attributes:
        num_channels: the common width ``max(num_channels) + min_padding_size``.
    """

    def __init__(
        self,
        modalities: Mapping[str, nn.Module],
        *,
        mask_probs: Mapping[str, float] | None = None,
        min_padding_size: int = 2,
    ) -> None:
        super().__init__()
        if not modalities:
            raise ValueError("MultimodalPreprocessor needs at least one modality")
        self.modality_names = sorted(modalities)
        self.modalities = nn.ModuleDict({m: modalities[m] for m in self.modality_names})
        self.num_channels = max(p.num_channels for p in modalities.values()) + min_padding_size
        self.padding = nn.ModuleDict({
            m: TrainablePositionEncoding(1, self.num_channels - self.modalities[m].num_channels)
            for m in self.modality_names
        })
        self.mask_probs = None
        self.mask_tokens = None
        if mask_probs is not None:
            missing = set(self.modality_names) - set(mask_probs)
            if missing:
                raise ValueError(f"mask_probs lacks modalities {sorted(missing)}")
            self.mask_probs = {m: float(mask_probs[m]) for m in self.modality_names}
            for m, prob in self.mask_probs.items():
                if not 0.0 <= prob <= 1.0:
                    raise ValueError(f"mask_probs[{m!r}] must be a probability in [0, 1], got {mask_probs[m]!r}")
            self.mask_tokens = nn.ModuleDict({m: TrainablePositionEncoding(1, self.num_channels)
                                              for m in self.modality_names})

    def _streaming(self, inputs: Mapping[str, Tensor]) -> list[str]:
        """The modalities whose preprocessor streams its input (see :meth:`streams`)."""
        if not isinstance(inputs, Mapping):
            return []
        return [m for m in self.modality_names if isinstance(inputs.get(m), Tensor)
                and getattr(self.modalities[m], "streams", lambda x: False)(inputs[m])]

    def streams(self, inputs: Mapping[str, Tensor]) -> bool:
        """Whether ``forward(inputs, chunk_size=n)`` gives a stream: some modality's preprocessor streams its
        input (an image's tokens); the other modalities are built whole and padded chunk by chunk."""
        return bool(self._streaming(inputs))

    def stream_length(self, inputs: Mapping[str, Tensor]) -> int:
        """Tokens of the modalities that stream (what decides whether and how to stream)."""
        return sum(math.prod(self.modalities[m].output_index_shape(tuple(inputs[m].shape)))
                   for m in self._streaming(inputs))

    def forward(self, inputs: Mapping[str, Tensor], *, generator: torch.Generator | None = None,
                chunk_size: int = 0) -> Preprocessed:
        """``{name: tensor}`` → ``Preprocessed([B, ΣM, num_channels], {name: M}, {name: features})``.

        With ``chunk_size > 0`` and :meth:`streams` true, the tokens are a
        :class:`~perceivers.layers.ContextStream` (the streaming modalities' features are then ``None``)."""
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a dict {{modality: tensor}} with {self.modality_names}, got "
                            f"{type(inputs).__name__}")
        if set(inputs) != set(self.modality_names):
            raise ValueError(f"inputs must have exactly the modalities {self.modality_names}, got {sorted(inputs)}")
        streaming = set(self._streaming(inputs)) if chunk_size > 0 else set()
        parts, sizes, without_pos = [], {}, {}
        for m in self.modality_names:
            kw = {"chunk_size": chunk_size} if m in streaming else {}
            x, _, without_pos[m] = self.modalities[m](inputs[m], **kw)  # [B, M, C_m] or its stream
            sizes[m] = x.shape[1]
            parts.append((x, self._row_map(m, x, generator)))
        batch = {m: x.shape[0] for m, (x, _) in zip(self.modality_names, parts)}
        first = batch[self.modality_names[0]]
        if any(b != first for b in batch.values()):  # pairwise: symbolic sizes (torch.export) are unhashable
            raise ValueError(f"all modalities must share the batch size, got {batch}")
        size = None if not streaming else max(x.chunk_size for x, _ in parts if isinstance(x, ContextStream))
        return Preprocessed(concat_rows(parts, self.num_channels, size), sizes, without_pos)

    def _row_map(self, name: str, x: Tensor | ContextStream, generator: torch.Generator | None) -> RowMap:
        """Rows ``a:b`` of modality ``name`` → padded to ``num_channels`` and masked (the mask is drawn here,
        for all its tokens, so that a stream's chunks see the draws of the whole array)."""
        pad = padder(self.padding[name])
        p = 0.0 if self.mask_tokens is None else self.mask_probs.get(name, 0.0)  # transformers' names some only
        if p <= 0.0:
            return pad
        token = self.mask_tokens[name].embeddings  # [1, C]
        if p >= 1.0:
            return lambda rows, a, b: token.to(rows.dtype).expand(rows.shape[0], b - a, -1)
        hit = torch.rand(x.shape[:2], device=x.device, generator=generator) < p  # [B, M]
        return lambda rows, a, b: torch.where(hit[:, a:b, None], token.to(rows.dtype), pad(rows, a, b))


@configurable
class MultimodalPostprocessor(nn.Module):
    """Split the decoder output ``[B, ΣQ, C]`` by modality (sorted order) and postprocess each."""

    def __init__(self, modalities: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.modalities = nn.ModuleDict({m: modalities[m] for m in sorted(modalities)})

    def forward(self, x: Tensor, *, modality_sizes: Mapping[str, int]) -> dict[str, Tensor]:
        parts = restructure(modality_sizes, x)
        return {m: self.modalities[m](parts[m]) for m in self.modalities}

    def heads(self) -> dict[str, Callable[[Tensor], Tensor] | None]:
        """Each modality's row-wise step (:func:`~perceivers.io.processors.postprocessors.rowwise_parts`), for
        the decoder to apply chunk by chunk; ``None`` where the modality's postprocessor needs its rows whole."""
        return {m: parts[0] if (parts := rowwise_parts(p)) else None for m, p in self.modalities.items()}

    def assemble(self, decoded: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The outputs from each modality's decoded rows (already through its :meth:`heads` step where it has one)."""
        return {m: parts[1](decoded[m]) if (parts := rowwise_parts(p)) else p(decoded[m])
                for m, p in self.modalities.items()}
