"""Test-only callbacks for the gradient guard: poison the gradients of chosen steps (the loss stays finite) and
record what each step changed. Importable by the CLI (this folder is on the test path)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; the backward pass sends ``value`` (NaN or Inf) into every gradient upstream."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, value: float) -> torch.Tensor:
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.full_like(grad, ctx.value), None


class PoisonGradients(Callback):
    """At the optimizer steps in ``steps`` (global step numbers), a forward hook on the task's model makes the
    backward pass produce non-finite gradients while the loss stays finite (an overflow in backward)."""

    def __init__(self, steps: list[int], value: float = float("nan")) -> None:
        self.steps, self.value = set(steps), value
        self._on = False

    def on_fit_start(self, trainer, pl_module) -> None:
        def hook(module, args, output):
            return _PoisonGrad.apply(output, self.value) if self._on and module.training else output

        pl_module.model.register_forward_hook(hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._on = trainer.global_step in self.steps


def _snapshot(pl_module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
    return weights, copy.deepcopy(optimizer.state_dict()["state"])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


class StepChanges(Callback):
    """For every optimizer step: did the weights change, did the optimizer state change (exact comparison)."""

    def __init__(self) -> None:
        self.changed: dict[int, tuple[bool, bool]] = {}
        self.weights_before: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        self._before = _snapshot(pl_module, trainer.optimizers[0])
        self.weights_before[self._step] = self._before[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights, state = _snapshot(pl_module, trainer.optimizers[0])
        self.changed[self._step] = (not _same(weights, self._before[0]), not _same(state, self._before[1]))
