"""Fourier features of low-precision coordinates are computed in float32 and rounded once.

Sines of arguments rounded to bfloat16 (8 bits) are off by up to the argument's rounding, which at
``π · max_resolution / 2`` is tenths of a radian; the features must instead be the float32 features of
the same coordinates, rounded once to the coordinates' dtype.
"""

from __future__ import annotations

import pytest
import torch

from perceivers.layers import FourierPositionEncoding, fourier_features


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["deepmind", "lucidrains"])
def test_low_precision_coordinates_get_float32_features_rounded_once(dtype, layout):
    gen = torch.Generator().manual_seed(0)
    pos = (torch.rand(64, 2, generator=gen) * 2 - 1).to(dtype)
    got = fourier_features(pos, 16, 64.0, layout=layout)
    assert got.dtype == dtype
    assert torch.equal(got, fourier_features(pos.float(), 16, 64.0, layout=layout).to(dtype))
    # the largest error against float64 is the final rounding alone (bfloat16: half an ulp of [-1, 1])
    err = (got.double() - fourier_features(pos.double(), 16, 64.0, layout=layout)).abs().max().item()
    assert err <= torch.finfo(dtype).eps / 2 * 1.01


def test_encode_keeps_float64_and_the_dtype_of_its_coordinates():
    enc = FourierPositionEncoding(2, 4, 8.0)
    pos = torch.rand(5, 2, dtype=torch.float64)
    assert enc.encode(pos).dtype == torch.float64
    assert torch.equal(enc.encode(pos), fourier_features(pos, 4, 8.0))
    assert enc.encode(pos.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["deepmind", "lucidrains"])
def test_tables_longer_than_their_axes_start_with_the_grid(layout):
    """``axis_tables(lengths=)`` (a downsampled stream's tables as long as the pixel axes, for torch.export): the
    first ``n`` rows are the grid's within an ulp, and a gather of flat positions equals ``forward``'s rows."""
    from perceivers.layers.position import axis_coordinates

    for n, length in ((1, 2), (2, 4), (5, 9), (7, 7)):
        coords = axis_coordinates(n, length=length)
        assert coords.shape == (length,)
        torch.testing.assert_close(coords[:n], torch.linspace(-1, 1, n), atol=1.2e-7, rtol=0)
    enc = FourierPositionEncoding(2, 3, (6.0, 9.0), layout=layout)
    for shape in ((1, 4), (3, 1), (3, 5)):
        lengths = (2 * shape[0], 2 * shape[1] + 1)
        tables = enc.axis_tables(shape, lengths=lengths)
        assert [t.shape[0] for t in tables] == list(lengths)
        index = torch.arange(shape[0] * shape[1]).flip(0)
        got = enc.grid_gather(shape, lengths=lengths)(index)
        torch.testing.assert_close(got, enc(shape)[index], atol=1e-6, rtol=0)
