"""The perceiver-pytorch family: Perceiver, PerceiverIO, PerceiverLM and their variants."""

from .experimental import BottomUpPerceiver
from .multimodal import (
    InputModality,
    InputModalityWithEmbedding,
    MultiModalityPerceiver,
    MultiModalityPerceiverNoPooling,
    MultiModalityWithTextPerceiver,
)
from .perceiver import Perceiver, PerceiverBlock
from .perceiver_io import PerceiverIO, PerceiverLM
from .variants import GatedPerceiver, MixedLatentsPerceiver

__all__ = [
    "BottomUpPerceiver",
    "GatedPerceiver",
    "InputModality",
    "InputModalityWithEmbedding",
    "MixedLatentsPerceiver",
    "MultiModalityPerceiver",
    "MultiModalityPerceiverNoPooling",
    "MultiModalityWithTextPerceiver",
    "Perceiver",
    "PerceiverBlock",
    "PerceiverIO",
    "PerceiverLM",
]
