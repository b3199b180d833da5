"""DeepMind's Perceiver IO, in the official decomposition, with readable PyTorch names.

``PerceiverIOModel(encoder, decoder, input_preprocessor=..., output_postprocessor=...)`` composes a
modality preprocessor (:mod:`.processors`), the generic :class:`PerceiverEncoder`, a decoder from
:mod:`.decoders` (with a query builder from :mod:`.queries`) and a postprocessor. The official task
models are assembled in :mod:`perceivers.tasks`.
"""

from .decoders import (
    BasicDecoder,
    ClassificationDecoder,
    FlowDecoder,
    MultimodalDecoder,
    ProjectionDecoder,
    VideoAutoencodingDecoder,
    couples_queries,
)
from .encoder import PerceiverEncoder
from .init import init_like_haiku
from .model import PerceiverIOModel, PerceiverIOOutput
from .positions import ProjectedPositions, TrainableGridPositions, build_position_encoding
from .queries import FourierQueries, InputQueries, TrainableQueries, subsampled_positions

__all__ = [
    "BasicDecoder",
    "ClassificationDecoder",
    "FlowDecoder",
    "FourierQueries",
    "InputQueries",
    "MultimodalDecoder",
    "PerceiverEncoder",
    "PerceiverIOModel",
    "PerceiverIOOutput",
    "ProjectedPositions",
    "ProjectionDecoder",
    "TrainableGridPositions",
    "TrainableQueries",
    "VideoAutoencodingDecoder",
    "build_position_encoding",
    "couples_queries",
    "init_like_haiku",
    "subsampled_positions",
]
