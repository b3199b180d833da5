"""Learning-rate schedules stepped once per optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["FlatCosine", "WarmupCosine"]


class FlatCosine(LambdaLR):
    """Constant for the first ``flat_fraction`` of training, then cosine decay to ``final_scale × lr``.

    DeepMind's Perceiver / Perceiver IO ImageNet schedule (flat for 50 %, cosine to 0, no warm-up).
    ``total_steps`` is filled in by the task with the run's optimizer step count when left ``None``.

    Args:
        warmup_steps: optional linear warm-up from 0 (counted inside the flat part).
        flat_steps: the flat part in steps, instead of ``flat_fraction``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        flat_fraction: float = 0.5,
        final_scale: float = 0.0,
        warmup_steps: int = 0,
        last_epoch: int = -1,
        flat_steps: int | None = None,
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise ValueError(f"FlatCosine needs total_steps >= 1, got {total_steps}")
        if not 0 <= flat_fraction <= 1:
            raise ValueError(f"flat_fraction must be in [0, 1], got {flat_fraction}")
        self.total_steps = total_steps
        flat = int(flat_fraction * total_steps) if flat_steps is None else min(flat_steps, total_steps)

        def scale(step: int) -> float:
            if warmup_steps and step < warmup_steps:
                return (step + 1) / warmup_steps
            if step < flat:
                return 1.0
            progress = min(1.0, (step - flat) / max(1, total_steps - flat))
            return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, scale, last_epoch=last_epoch)


class WarmupCosine(FlatCosine):
    """Linear warm-up over ``warmup_steps``, then cosine decay over the rest (no flat part)."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        final_scale: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, total_steps, final_scale=final_scale, warmup_steps=warmup_steps,
                         last_epoch=last_epoch, flat_steps=warmup_steps)  # in steps: a fraction rounds down
