"""Raw-audio pre- and postprocessing: non-overlapping patches of ``samples_per_patch`` samples."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ...configurable import configurable
from ...layers.dense import Linear
from ...validation import check_count, check_tensor
from .base import Preprocessed, add_positions, check_pos_mode
from .postprocessors import RowwisePostprocessor

__all__ = ["AudioPostprocessor", "AudioPreprocessor"]


@configurable
class AudioPreprocessor(nn.Module):
    """Waveform ``[B, N]`` or ``[B, N, 1]`` → patches ``[B, N / samples_per_patch, samples_per_patch]`` + positions.

    Args:
        samples_per_patch: samples per token.
        position_encoding: ``(index_shape) -> [M, Cp]`` over the 1-D patch index, or ``None``.
        concat_or_add_pos: ``"concat"`` or ``"add"``.
    """

    def __init__(
        self,
        samples_per_patch: int = 96,
        *,
        position_encoding: nn.Module | None = None,
        concat_or_add_pos: Literal["concat", "add"] = "concat",
    ) -> None:
        super().__init__()
        check_count(samples_per_patch=samples_per_patch)
        self.samples_per_patch = samples_per_patch
        self.position_encoding = position_encoding
        self.concat_or_add_pos = concat_or_add_pos
        self.feature_channels = samples_per_patch
        self.num_channels = check_pos_mode(concat_or_add_pos, samples_per_patch, position_encoding)

    def forward(self, audio: Tensor) -> Preprocessed:
        check_tensor(audio, "audio", kind="float", ndim=(2, 3), layout="[batch, samples] or [batch, samples, 1]")
        if audio.ndim == 3 and audio.shape[-1] == 1:
            audio = audio[..., 0]
        if audio.ndim != 2:
            raise ValueError(f"audio must be [batch, samples] or [batch, samples, 1], got {tuple(audio.shape)}")
        if audio.shape[1] % self.samples_per_patch:
            raise ValueError(f"{audio.shape[1]} samples are not divisible by samples_per_patch={self.samples_per_patch}")
        patches = audio.reshape(audio.shape[0], -1, self.samples_per_patch)  # [B, M, spp]
        inputs = add_positions(patches, (patches.shape[1],), self.position_encoding, self.concat_or_add_pos)
        return Preprocessed(inputs, None, patches)


@configurable
class AudioPostprocessor(RowwisePostprocessor):
    """``[B, Q, C]`` → ``Linear(C → samples_per_patch)`` → waveform ``[B, Q · samples_per_patch]``."""

    def __init__(self, in_channels: int, samples_per_patch: int = 96) -> None:
        super().__init__()
        self.samples_per_patch = samples_per_patch
        self.linear = Linear(in_channels, samples_per_patch)

    def rowwise(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def assemble(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], -1)
