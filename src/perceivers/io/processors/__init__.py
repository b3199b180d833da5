"""Modality processors: raw inputs → ``[B, M, C]`` tokens, and decoder outputs → task outputs.

Every preprocessor exposes ``num_channels`` at construction and returns
:class:`Preprocessed` ``(inputs, modality_sizes, inputs_without_pos)``.
"""

from .audio import AudioPostprocessor, AudioPreprocessor
from .base import Preprocessed, add_positions, restructure
from .flow import FlowPreprocessor, patches_for_flow
from .image import ConvDownsample, ImagePreprocessor, same_padding, space_to_depth
from .label import OneHotPreprocessor
from .multimodal import MultimodalPostprocessor, MultimodalPreprocessor
from .postprocessors import (
    ClassificationPostprocessor,
    ProjectionPostprocessor,
    RowwisePostprocessor,
    rowwise_parts,
)
from .text import EmbeddingDecoder, TextPreprocessor

__all__ = [
    "AudioPostprocessor",
    "AudioPreprocessor",
    "ClassificationPostprocessor",
    "ConvDownsample",
    "EmbeddingDecoder",
    "FlowPreprocessor",
    "ImagePreprocessor",
    "MultimodalPostprocessor",
    "MultimodalPreprocessor",
    "OneHotPreprocessor",
    "Preprocessed",
    "ProjectionPostprocessor",
    "RowwisePostprocessor",
    "TextPreprocessor",
    "add_positions",
    "patches_for_flow",
    "restructure",
    "rowwise_parts",
    "same_padding",
    "space_to_depth",
]
