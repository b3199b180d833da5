"""perceivers.experimental: the bottom-up Perceiver, GatedPerceiver and MixedLatentsPerceiver (tiny models)."""

from __future__ import annotations

import pytest
import torch

from perceivers.experimental import GatedPerceiver, LinearAttention, MixedLatentsPerceiver, Perceiver
from perceivers.models.experimental import BottomUpPerceiver

SMALL = {"num_freq_bands": 3, "max_freq": 6.0, "num_latents": 4, "latent_dim": 16, "cross_heads": 1,
         "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8, "num_classes": 5}
MODELS = [Perceiver, GatedPerceiver, MixedLatentsPerceiver]


def test_public_name() -> None:
    assert Perceiver is BottomUpPerceiver


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_shapes_with_fourier_features(cls) -> None:
    """With Fourier features on (which perceiver-pytorch's experimental model cannot run)."""
    model = cls(**SMALL, depth=2, input_channels=3, input_axis=2).eval()
    assert model.context_dim == 3 + 2 * (2 * 3 + 1)
    x = torch.randn(2, 4, 5, 3)
    assert model(x).shape == (2, 5)
    assert model(x, return_embeddings=True).shape == (2, 4, 16)
    no_fourier = cls(**SMALL, depth=2, input_channels=3, input_axis=1, fourier_encode_data=False)
    assert no_fourier.context_dim == 3
    assert no_fourier(torch.randn(2, 7, 3)).shape == (2, 5)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tied", [False, True])
def test_backward_reaches_every_parameter(cls, tied: bool, randomize) -> None:
    """Also checks that no dead parameters exist (the bottom-up model's last layer has no token update)."""
    model = randomize(cls(**SMALL, depth=3, input_channels=2, input_axis=1, weight_tie_layers=tied)).train()
    model(torch.randn(2, 6, 2)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert len(model.blocks) == (2 if tied else 3)


def test_bottom_up_sublayers_only_where_used() -> None:
    untied = Perceiver(**SMALL, depth=3, input_channels=2, input_axis=1)
    assert [b.input_attn is not None for b in untied.blocks] == [True, True, False]
    tied2 = Perceiver(**SMALL, depth=2, input_channels=2, input_axis=1, weight_tie_layers=True)
    assert [b.input_attn is not None for b in tied2.blocks] == [True, False]
    tied3 = Perceiver(**SMALL, depth=3, input_channels=2, input_axis=1, weight_tie_layers=True)
    assert [b.input_attn is not None for b in tied3.blocks] == [True, True]
    with pytest.raises(ValueError, match="without the bottom-up"):
        untied.blocks[2](torch.randn(1, 4, 16), torch.randn(1, 6, untied.context_dim))


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_masked_tokens_do_not_matter(cls, randomize) -> None:
    model = randomize(cls(**SMALL, depth=3, input_channels=2, input_axis=2)).eval()
    x = torch.randn(2, 3, 4, 2)
    mask = torch.rand(2, 3, 4) > 0.4
    mask[:, 0, 0] = True
    y = x.masked_fill(~mask[..., None], 50.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask=mask), model(y, mask=mask))


def test_linear_attention_mask() -> None:
    attn = LinearAttention(6, num_heads=2, head_dim=4)
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    out = attn(x, mask=mask)
    assert out.shape == (2, 5, 6) and torch.isfinite(out).all()
    y = x.clone()
    y[0, 2] = 9.0  # a masked token changes only its own output
    changed = (attn(y, mask=mask) - out).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False, False, True, False, False]


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_input_errors(cls) -> None:
    model = cls(**SMALL, depth=1, input_channels=3, input_axis=2)
    with pytest.raises(ValueError, match="3 channels.*got 4"):
        model(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="input_axis=2"):
        model(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"\[batch=2, 4, 4\].*\[batch, 16\]"):
        model(torch.randn(2, 4, 4, 3), mask=torch.ones(2, 15, dtype=torch.bool))


def test_mixed_latents_rejects_unknown_arguments() -> None:
    with pytest.raises(TypeError):
        MixedLatentsPerceiver(**SMALL, depth=1, self_per_cross_attn=2)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_save_and_load_round_trip(cls, tmp_path, randomize) -> None:
    from perceivers.hub import from_pretrained, save_pretrained

    model = randomize(cls(**SMALL, depth=3, input_channels=2, input_axis=1, weight_tie_layers=True)).eval()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is cls
    x = torch.randn(2, 6, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("name", "value"), [("num_latents", 0), ("latent_dim", 0), ("cross_heads", 0),
                                             ("cross_dim_head", 0), ("input_axis", 0), ("num_latents", True),
                                             ("input_channels", -1)])
def test_bad_sizes_are_refused_at_construction(cls, name: str, value) -> None:
    """num_latents=0 built a model whose logits were NaN (the mean of no latents); the other sizes failed in
    forward with a ZeroDivisionError, an IndexError or a reshape error."""
    with pytest.raises(ValueError, match=rf"{name} must be an int >= -?\d, got {value!r}"):
        cls(**{**SMALL, "depth": 1, "input_channels": 3, "input_axis": 2, name: value})


@pytest.mark.parametrize("cls", [Perceiver, GatedPerceiver], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["latent_heads", "latent_dim_head"])
def test_bad_latent_attention_sizes_are_refused(cls, name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 1, got 0"):
        cls(**{**SMALL, "depth": 1, name: 0})


def test_mixed_latents_ignores_its_unused_latent_attention_sizes() -> None:
    """There is no latent attention in this variant: the arguments are accepted for compatibility, unchecked."""
    assert MixedLatentsPerceiver(**{**SMALL, "depth": 1, "latent_heads": 0})(torch.randn(1, 3, 3, 3)).shape == (1, 5)


def test_no_input_channels_needs_fourier_features() -> None:
    for cls in MODELS:
        with pytest.raises(ValueError, match="input_channels=0 .* needs fourier_encode_data=True"):
            cls(**SMALL, depth=1, input_channels=0, fourier_encode_data=False)


def test_bottom_up_input_attention_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="input_heads must be an int >= 1, got 0"):
        Perceiver(**SMALL, depth=2, input_heads=0)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        LinearAttention(6, num_heads=0)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda a, x: a(torch.randn(2, 5, 7)), ValueError, r"x must have shape \[batch, tokens, 6\], got \(2, 5, 7\)"),
    (lambda a, x: a(torch.randn(5, 6)), ValueError, r"x must have shape \[batch, tokens, 6\], got \(5, 6\)"),
    (lambda a, x: a(x, mask=torch.ones(2, 5)), ValueError, "mask must have dtype torch.bool"),
    (lambda a, x: a(x, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask must have shape \[batch=2, 5\]"),
    (lambda a, x: a(x, mask=torch.ones(1, 5, dtype=torch.bool)), ValueError, r"mask must have shape \[batch=2, 5\]"),
    (lambda a, x: a(x.double()), TypeError, "x has dtype torch.float64 but the model's parameters are torch.float32"),
])
def test_linear_attention_names_bad_input(call, error, match) -> None:
    """LinearAttention is public (perceivers.experimental): bad input failed inside torch with messages naming no
    expectation (a matmul shape, 'bitwise_not' on a float mask), and a [1, M] mask was broadcast silently."""
    attn = LinearAttention(6, num_heads=2, head_dim=4)
    with pytest.raises(error, match=match):
        call(attn, torch.randn(2, 5, 6))
