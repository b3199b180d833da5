"""``perceivers.layers.rotary``: angles and rotation stay float32 whatever the model's dtype."""

import torch

from perceivers.layers.rotary import RotaryEmbedding, rotary_frequencies, rotate


def test_angles_are_float32_from_the_formula_after_a_half_precision_cast():
    rotary = RotaryEmbedding(8)
    positions = torch.arange(3000)
    before = rotary(positions)
    rotary.to(torch.bfloat16)  # rounds the inv_freq buffer; the angles do not use it
    assert rotary.inv_freq.dtype == torch.bfloat16
    assert before.dtype == torch.float32 and torch.equal(rotary(positions), before)
    assert torch.equal(before[:, :4], before[:, 4:])  # each frequency serves both halves
    assert torch.allclose(before[5, :4], 5 * rotary_frequencies(8))
    assert "inv_freq" not in rotary.state_dict() and "inv_freq" in RotaryEmbedding(8, persistent=True).state_dict()


def test_rotation_in_bfloat16_is_the_float32_rotation_rounded():
    """cos/sin of angles in the thousands need float32: the bf16 result is the float32 one rounded once."""
    t = torch.randn(2, 3, 3000, 16).bfloat16().float()  # exactly representable in bfloat16
    angles = RotaryEmbedding(8)(torch.arange(3000))
    exact = rotate(t, angles)
    half = rotate(t.bfloat16(), angles)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, exact.bfloat16())
    assert torch.equal(exact[..., 8:], t[..., 8:])  # channels past the rotated ones pass through
    norms = exact[..., :8].reshape(*exact.shape[:-1], 2, 4).pow(2).sum(-2)  # each (i, i + 4) pair keeps its norm
    assert torch.allclose(norms, t[..., :8].reshape(*t.shape[:-1], 2, 4).pow(2).sum(-2), atol=1e-4)
