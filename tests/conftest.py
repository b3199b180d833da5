"""Shared test set-up: thread count, seeding, hypothesis profiles, parameter randomisation.

The machine running the suite is small and shared, so torch uses one thread per process: with two
threads a tiny model's test ran 20× slower on two busy cores (OpenMP workers waiting on each other).
Every test starts from the same seed.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One thread per process (and per xdist worker); override with PERCEIVERS_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("PERCEIVERS_TEST_THREADS", "1")))

# Property tests: few, reproducible examples by default ("ci"); `--hypothesis-profile=fuzz` for long runs.
settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from torch seed 0 (tests that need other seeds set them themselves)."""
    torch.manual_seed(0)


def randomize_parameters_(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Overwrite every parameter with seeded random values, in place.

    Nothing stays at its initial value: norm weights become ``1 + scale·N(0, 1)``, every bias
    ``scale·N(0, 1)``, linear weights ``N(0, 1/fan_in)`` and other tensors (latents, embeddings)
    ``N(0, 1)``. Shared (tied) parameters are drawn once.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                if name == "bias":
                    p.copy_(scale * noise)
                elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                    p.copy_(1.0 + scale * noise)
                elif isinstance(mod, nn.Linear):
                    p.copy_(noise / p.shape[1] ** 0.5)
                else:
                    p.copy_(noise)
    return module


@pytest.fixture
def randomize():
    """:func:`randomize_parameters_` as a fixture, for test modules in any folder."""
    return randomize_parameters_
