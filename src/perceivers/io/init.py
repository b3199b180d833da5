"""Haiku's default initialisation, for training from scratch the way the official models were trained."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["init_like_haiku"]


@torch.no_grad()
def init_like_haiku(module: nn.Module) -> nn.Module:
    """Re-initialise ``module`` in place as Haiku would, and return it.

    * ``Linear``: truncated normal (±2σ) with σ = 1/√fan_in, zero bias (zero weight where the
      official code asks for it: flow output, projection decoder);
    * ``Conv2d``: VarianceScaling(1, fan_in, truncated normal), zero bias;
    * ``LayerNorm`` / ``BatchNorm``: scale 1, offset 0, running statistics reset;
    * trainable tables keep their truncated normal with std 0.02 (latents, queries, positions,
      paddings, mask tokens); embeddings keep Haiku's std 1.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if getattr(m, "_haiku_zero_init", False):
                nn.init.zeros_(m.weight)
            else:
                std = 1.0 / math.sqrt(m.in_features)
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
            std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
    return module
