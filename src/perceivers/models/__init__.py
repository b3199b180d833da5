"""The perceiver-pytorch family: Perceiver, PerceiverIO, PerceiverLM and their variants."""

from .experimental import BottomUpPerceiver
from .multimodal import (
    HierarchicalConfigurator,
    HierarchicalMultiModalityPerceiver,
    HierarchicalMultiModalityPerceiverNoPooling,
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
    "HierarchicalConfigurator",
    "HierarchicalMultiModalityPerceiver",
    "HierarchicalMultiModalityPerceiverNoPooling",
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
