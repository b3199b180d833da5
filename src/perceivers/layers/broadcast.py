"""Learned arrays (latents, queries, position tables) given to every sample of a batch."""

from __future__ import annotations

import torch
from torch import Tensor


def per_sample(array: Tensor, batch: int) -> Tensor:
    """``array [*shape]`` for each of ``batch`` samples → ``[batch, *shape]``, a broadcast view (no copy).

    Without autograd the view is detached: a view of a parameter keeps ``requires_grad`` even under
    ``torch.no_grad()``, and PyTorch's module tracker (``FlopCounterMode``, Lightning's model summary)
    fails on a module input that has it but no gradient function.
    """
    out = array.expand(batch, *array.shape)
    return out.detach() if out.requires_grad and not torch.is_grad_enabled() else out
