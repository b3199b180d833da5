"""The perceiver-pytorch family: Perceiver, PerceiverIO, PerceiverLM and their variants."""

from .multimodal import (
    InputModality,
    InputModalityWithEmbedding,
    MultiModalityPerceiver,
    MultiModalityPerceiverNoPooling,
    MultiModalityWithTextPerceiver,
)
from .perceiver import Perceiver, PerceiverBlock
from .perceiver_io import PerceiverIO, PerceiverLM

__all__ = [
    "InputModality",
    "InputModalityWithEmbedding",
    "MultiModalityPerceiver",
    "MultiModalityPerceiverNoPooling",
    "MultiModalityWithTextPerceiver",
    "Perceiver",
    "PerceiverBlock",
    "PerceiverIO",
    "PerceiverLM",
]
