"""Accuracy (not only finiteness) of ``Perceiver`` in bfloat16 / float16 against a float64 copy.

Per-sample coordinates (``pos``) must be as accurate as the same grid given as an image: their Fourier
features computed in float32 from the coordinates as given and rounded once, like the grid's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import perceivers
from perceivers.layers import linear_positions


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 128], ids=["whole", "streamed"])
def test_per_sample_positions_are_as_accurate_as_the_grid(dtype, chunk_size):
    torch.manual_seed(0)
    model = perceivers.Perceiver(num_freq_bands=16, depth=1, max_freq=64.0, input_channels=3, input_axis=2,
                                 num_latents=8, latent_dim=32, cross_heads=1, latent_heads=2, cross_dim_head=16,
                                 latent_dim_head=16, num_classes=8, chunk_size=chunk_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    data = torch.randn(2, 16, 16, 3).to(dtype)
    pos = linear_positions((16, 16)).reshape(1, -1, 2).expand(2, -1, -1)  # float32, as a user has them
    exact = copy.deepcopy(model).double()
    low = model.to(dtype)
    with torch.no_grad():
        grid_err = _rel(low(data), exact(data.double()))
        pos_err = _rel(low(data.flatten(1, 2), pos=pos), exact(data.flatten(1, 2).double(), pos=pos.double()))
    # before: features from coordinates rounded to the model's dtype, 12x (bfloat16) / 9x (float16) the grid's
    assert pos_err <= 1.5 * grid_err, (pos_err, grid_err)
