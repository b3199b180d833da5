"""The official Perceiver IO task models as named, registered variants.

>>> model = create_model("vision-perceiver-fourier", num_labels=10)   # doctest: +SKIP
>>> list_models()   # doctest: +SKIP
"""

from .common import TrunkConfig
from .image_classification import ImageClassificationConfig, ImageClassifier, ImageClassifierOutput
from .language import MaskedLanguageModel, MaskedLanguageModelConfig, MaskedLMOutput
from .multimodal import MultimodalAutoencoder, MultimodalAutoencodingConfig, MultimodalAutoencodingOutput
from .optical_flow import OpticalFlowConfig, OpticalFlowModel, OpticalFlowOutput
from .pretrained import HAIKU_BASE_URL, PretrainedCfg
from .registry import ModelEntry, create_model, list_models, model_entry, register_model
from .text_classification import (
    SequenceClassificationConfig,
    SequenceClassifier,
    SequenceClassifierOutput,
    TrunkTransfer,
    from_language_model,
)
from .token_classification import TokenClassificationConfig, TokenClassifier, TokenClassifierOutput

__all__ = [
    "HAIKU_BASE_URL",
    "ImageClassificationConfig",
    "ImageClassifier",
    "ImageClassifierOutput",
    "MaskedLMOutput",
    "MaskedLanguageModel",
    "MaskedLanguageModelConfig",
    "ModelEntry",
    "MultimodalAutoencoder",
    "MultimodalAutoencodingConfig",
    "MultimodalAutoencodingOutput",
    "OpticalFlowConfig",
    "OpticalFlowModel",
    "OpticalFlowOutput",
    "PretrainedCfg",
    "SequenceClassificationConfig",
    "SequenceClassifier",
    "SequenceClassifierOutput",
    "TokenClassificationConfig",
    "TokenClassifier",
    "TokenClassifierOutput",
    "TrunkConfig",
    "TrunkTransfer",
    "create_model",
    "from_language_model",
    "list_models",
    "model_entry",
    "register_model",
]
