"""perceivers: DeepMind's Perceiver family in PyTorch — complete, exact and fast.

Importing this package loads only torch, einops and numpy; training, export and reference
libraries are imported by the submodules that need them. Names listed in ``_LAZY`` are imported on
first use.
"""

from importlib import import_module
from typing import Any

from .models import (
    BottomUpPerceiver,
    GatedPerceiver,
    HierarchicalConfigurator,
    HierarchicalMultiModalityPerceiver,
    HierarchicalMultiModalityPerceiverNoPooling,
    InputModality,
    InputModalityWithEmbedding,
    MixedLatentsPerceiver,
    MultiModalityPerceiver,
    MultiModalityPerceiverNoPooling,
    MultiModalityWithTextPerceiver,
    Perceiver,
    PerceiverBlock,
    PerceiverIO,
    PerceiverLM,
)

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "create_model": "perceivers.tasks.registry",
    "list_models": "perceivers.tasks.registry",
    "PatchPerceiver": "perceivers.models.patch",
    "PerceiverAR": "perceivers.models.perceiver_ar",
    "CausalLanguageModel": "perceivers.models.perceiver_ar",
    "AutoregressiveWrapper": "perceivers.perceiver_ar_pytorch",
    "pad_grid_batch": "perceivers.batching",
    "pad_point_batch": "perceivers.batching",
    "from_pretrained": "perceivers.hub",
    "load_checkpoint": "perceivers.hub",
    "save_pretrained": "perceivers.hub",
    "FlashPerceiver": "perceivers.flash_perceiver",
    "FlashPerceiverIO": "perceivers.flash_perceiver",
}

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
    "__version__",
]
__all__ += list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'perceivers' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
