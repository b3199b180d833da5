"""FlashPerceiver's positional encodings in bfloat16 / float16 and under autocast: computed in float32, rounded once.

Their arguments reach tens (Gaussian, sigma 10) to thousands of radians (NeRF, 10 bands), where a
bfloat16 argument is off by more than a radian; the features must be within one rounding of the exact
features of the same (rounded) coordinates and projection.
"""

from __future__ import annotations

import copy

import pytest
import torch

from perceivers import flash_perceiver as fp

ENCODERS = {"gaussian": lambda: fp.GaussianFourierFeatureTransform(2, 64, sigma=10.0, seed=0),
            "nerf": lambda: fp.NeRFPositionalEncoding(2, 10)}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_low_precision_encoders_round_once(name, dtype):
    enc = ENCODERS[name]().to(dtype)
    x = (torch.rand(512, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    out = enc(x)
    ref = copy.deepcopy(enc).double()(x.double())  # the same rounded projection, exact arithmetic
    assert out.dtype == dtype
    # one rounding: relative error ~ eps / 3 (bfloat16 1.3e-3); before: 0.1-0.5 in bfloat16, 0.01-0.06 in float16
    assert _rel(out, ref) < torch.finfo(dtype).eps


@pytest.mark.parametrize("name", list(ENCODERS))
def test_autocast_does_not_round_the_arguments(name):
    enc = ENCODERS[name]()
    x = torch.rand(512, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", torch.bfloat16):
        out = enc(x)
    assert torch.equal(out, enc(x))  # float32 features (before: the Gaussian projection ran in bfloat16, 0.17 off)


def test_bfloat16_image_adapter_with_gaussian_features():
    """A bfloat16 ImageAdapter passes float32 grid coordinates to its bfloat16 projection (before: einsum refused
    the mixed dtypes); the float32 features are cast to the image's dtype."""
    adapter = fp.ImageAdapter(16, num_channels=3, pos_encoding=ENCODERS["gaussian"]()).to(torch.bfloat16)
    out = adapter(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 16, 16) and torch.isfinite(out).all()
