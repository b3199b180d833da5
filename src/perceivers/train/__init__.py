"""Training: LightningModules, DataModules, callbacks and the LightningCLI behind ``perceivers fit``.

The only part of perceivers that imports Lightning and torchmetrics; ``import perceivers`` never loads it.
"""

from .callbacks import (
    NonFiniteGradientGuard,
    NonFiniteLossGuard,
    ReplicaCheck,
    RestoreBestWeights,
    ResumableMetrics,
    RNGState,
    TrainingPlots,
)
from .checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from .data import (
    ArrayDataModule,
    CIFARDataModule,
    DigitsDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MaskedBytesDataModule,
    TextClassificationDataModule,
)
from .loggers import RunCSVLogger
from .schedules import FlatCosine, WarmupCosine
from .strategies import FSDP2Strategy
from .tasks import ClassificationTask, ConfigError, MaskedLMTask, Task, build_model

__all__ = [
    "ArrayDataModule",
    "AtomicCheckpointIO",
    "CIFARDataModule",
    "ClassificationTask",
    "ConfigError",
    "DigitsDataModule",
    "FSDP2Strategy",
    "FlatCosine",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MaskedBytesDataModule",
    "MaskedLMTask",
    "NonFiniteGradientGuard",
    "NonFiniteLossGuard",
    "RNGState",
    "ReplicaCheck",
    "RestoreBestWeights",
    "ResumableMetrics",
    "RunCSVLogger",
    "Task",
    "TextClassificationDataModule",
    "TrainingPlots",
    "WarmupCosine",
    "atomic_torch_save",
    "build_model",
]
