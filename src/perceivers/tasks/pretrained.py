"""Pretrained-model metadata as data: where the official weights live and what they expect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HAIKU_BASE_URL", "PretrainedCfg"]

HAIKU_BASE_URL = "https://storage.googleapis.com/perceiver_io/"


@dataclass(frozen=True)
class PretrainedCfg:
    """What a registered model's official checkpoint is and how its inputs look.

    Attributes:
        task: short task name (``"image-classification"``, ``"masked-lm"``, ...).
        haiku_checkpoint: file name of DeepMind's Haiku pickle (under :data:`HAIKU_BASE_URL`).
        hf_hub_id: the transformers port on the Hugging Face Hub (its weights differ in places).
        input_size: expected input shape without the batch axis, PyTorch layout.
        mean, std: per-channel normalisation of [0, 1] pixels (``None`` where there is none).
        num_classes: size of the label space, with ``label_set`` naming it.
        num_params: parameter count of the official model (Haiku ``init``).
        metrics: published results of exactly this checkpoint (paper and table in ``notes``).
        license: licence of the official weights.
        notes: anything a user must know to reproduce the official outputs.
    """

    task: str
    haiku_checkpoint: str | None = None
    hf_hub_id: str | None = None
    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_classes: int | None = None
    label_set: str | None = None
    num_params: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    license: str = "CC-BY-4.0"
    notes: str = ""

    @property
    def haiku_url(self) -> str | None:
        """Download address of the official Haiku checkpoint."""
        return None if self.haiku_checkpoint is None else HAIKU_BASE_URL + self.haiku_checkpoint
