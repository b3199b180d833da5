"""krasserm's perceiver-io (PyPI ``perceiver-io`` 0.11) backend API on perceivers' layers.

Change the imports and keep the rest (constructors, configs, state-dict keys, outputs):

* ``from perceiver.model.core import X`` → ``from perceivers.krasserm import X``
  (``PerceiverEncoder``, ``PerceiverDecoder``, ``PerceiverIO``, the adapters, the configs);
* ``from perceiver.model.text.mlm import MaskedLanguageModel, MaskedLanguageModelConfig, TextDecoderConfig``,
  ``from perceiver.model.text.classifier import TextClassifier, TextClassifierConfig`` and
  ``from perceiver.model.text.common import TextEncoderConfig`` → ``from perceivers.krasserm import ...``
  (or ``perceivers.krasserm.text``);
* ``from perceiver.model.vision.image_classifier import ImageClassifier, ImageClassifierConfig,
  ImageEncoderConfig`` → ``from perceivers.krasserm import ...`` (or ``perceivers.krasserm.vision``).

Not covered: the Lightning modules (``Lit*``), the Hugging Face wrappers and pipelines, the data
modules, optical flow; Perceiver AR is :class:`perceivers.CausalLanguageModel`. See docs/krasserm.md.
"""

from perceivers.krasserm.core import (
    MLP,
    ClassificationDecoderConfig,
    ClassificationOutputAdapter,
    CrossAttention,
    CrossAttentionLayer,
    DecoderConfig,
    EncoderConfig,
    FourierPositionEncoding,
    InputAdapter,
    ModuleOutput,
    MultiHeadAttention,
    OutputAdapter,
    PerceiverDecoder,
    PerceiverEncoder,
    PerceiverIO,
    PerceiverIOConfig,
    QueryProvider,
    Residual,
    SelfAttention,
    SelfAttentionBlock,
    SelfAttentionLayer,
    TiedTokenOutputAdapter,
    TokenInputAdapter,
    TrainableQueryProvider,
    freeze,
    init_parameters,
    positions,
)
from perceivers.krasserm.text import (
    MaskedLanguageModel,
    MaskedLanguageModelConfig,
    TextClassifier,
    TextClassifierConfig,
    TextDecoder,
    TextDecoderConfig,
    TextEncoder,
    TextEncoderConfig,
    TokenOutputAdapter,
)
from perceivers.krasserm.vision import (
    ImageClassifier,
    ImageClassifierConfig,
    ImageEncoder,
    ImageEncoderConfig,
    ImageInputAdapter,
)

__all__ = [
    "MLP",
    "ClassificationDecoderConfig",
    "ClassificationOutputAdapter",
    "CrossAttention",
    "CrossAttentionLayer",
    "DecoderConfig",
    "EncoderConfig",
    "FourierPositionEncoding",
    "ImageClassifier",
    "ImageClassifierConfig",
    "ImageEncoder",
    "ImageEncoderConfig",
    "ImageInputAdapter",
    "InputAdapter",
    "MaskedLanguageModel",
    "MaskedLanguageModelConfig",
    "ModuleOutput",
    "MultiHeadAttention",
    "OutputAdapter",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "PerceiverIOConfig",
    "QueryProvider",
    "Residual",
    "SelfAttention",
    "SelfAttentionBlock",
    "SelfAttentionLayer",
    "TextClassifier",
    "TextClassifierConfig",
    "TextDecoder",
    "TextDecoderConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "TiedTokenOutputAdapter",
    "TokenInputAdapter",
    "TokenOutputAdapter",
    "TrainableQueryProvider",
    "freeze",
    "init_parameters",
    "positions",
]
