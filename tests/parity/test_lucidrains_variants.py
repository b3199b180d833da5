"""Parity with perceiver-pytorch 0.11.0's experimental, gated and mixed_latents Perceivers (same weights)."""

from __future__ import annotations

import warnings

import pytest
import torch

from perceivers.convert import detect_variant, from_lucidrains_variant
from perceivers.experimental import GatedPerceiver, MixedLatentsPerceiver, Perceiver

lr_experimental = pytest.importorskip("perceiver_pytorch.experimental")
lr_gated = pytest.importorskip("perceiver_pytorch.gated")
lr_mixed = pytest.importorskip("perceiver_pytorch.mixed_latents")

SMALL = {"num_freq_bands": 3, "max_freq": 6.0, "num_latents": 5, "latent_dim": 16, "cross_heads": 2,
         "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8, "num_classes": 3}
OURS = {"experimental": Perceiver, "gated": GatedPerceiver, "mixed_latents": MixedLatentsPerceiver}
THEIRS = {"experimental": lr_experimental, "gated": lr_gated, "mixed_latents": lr_mixed}
CASES = [
    # experimental only runs without Fourier features in perceiver-pytorch (its token width is miscounted)
    ("experimental", {"depth": 2, "input_axis": 1, "input_channels": 5, "fourier_encode_data": False}),
    ("experimental", {"depth": 3, "input_axis": 2, "input_channels": 3, "fourier_encode_data": False}),
    ("experimental", {"depth": 3, "input_axis": 1, "input_channels": 4, "fourier_encode_data": False,
                      "weight_tie_layers": True}),
    ("experimental", {"depth": 2, "input_axis": 1, "input_channels": 4, "fourier_encode_data": False,
                      "weight_tie_layers": True}),
    ("gated", {"depth": 2, "input_axis": 2, "input_channels": 3}),
    ("gated", {"depth": 3, "input_axis": 1, "input_channels": 2, "weight_tie_layers": True}),
    ("mixed_latents", {"depth": 2, "input_axis": 2, "input_channels": 3}),
    ("mixed_latents", {"depth": 3, "input_axis": 1, "input_channels": 2, "weight_tie_layers": True}),
]


def _randomized(model: torch.nn.Module, randomize) -> torch.nn.Module:
    """Random parameters everywhere; GRU weights fan-in scaled like linear layers (N(0, 1) saturates the gates)."""
    randomize(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gru.weight" in name:
                p.div_(p.shape[1] ** 0.5)
    return model


def _data(kwargs: dict) -> torch.Tensor:
    axes = (4, 3) if kwargs["input_axis"] == 2 else (7,)
    return torch.randn(2, *axes, kwargs["input_channels"])


# perceiver-pytorch's experimental model fails on any mask (its linear attention), so it runs unmasked only.
PARAMS = [(v, k, masked) for v, k in CASES for masked in (False, True) if not (masked and v == "experimental")]


def _id(variant: str, kwargs: dict, masked: bool) -> str:
    tied = "-tied" if kwargs.get("weight_tie_layers") else ""
    return f"{variant}-d{kwargs['depth']}-ax{kwargs['input_axis']}{tied}{'-mask' if masked else ''}"


@pytest.mark.parametrize(("variant", "kwargs", "masked"), PARAMS, ids=[_id(*p) for p in PARAMS])
def test_matches_perceiver_pytorch(variant: str, kwargs: dict, masked: bool, randomize) -> None:
    theirs = _randomized(THEIRS[variant].Perceiver(**SMALL, **kwargs), randomize).eval()
    sd = theirs.state_dict()
    assert detect_variant(sd) == variant
    ours = OURS[variant](**SMALL, **kwargs).eval()
    ours.load_state_dict(from_lucidrains_variant(sd), strict=True)
    data = _data(kwargs)
    mask = None
    if masked:
        mask = torch.rand(data.shape[:-1]) > 0.3
        mask.view(2, -1)[:, 0] = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(data, mask=mask)
        actual = ours(data, mask=mask)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_experimental_fourier_features_as_the_original_would_compute_them(randomize) -> None:
    """Ours with Fourier features == the original without them, fed the data with its own Fourier features
    appended (what its broken ``fourier_encode_data=True`` path means to do)."""
    from perceiver_pytorch.perceiver_pytorch import fourier_encode

    kwargs = {**SMALL, "depth": 3, "input_axis": 2}
    theirs = randomize(lr_experimental.Perceiver(**kwargs, input_channels=3 + 2 * 7, fourier_encode_data=False))
    ours = Perceiver(**kwargs, input_channels=3).eval()
    ours.load_state_dict(from_lucidrains_variant(theirs.state_dict()), strict=True)
    data = torch.randn(2, 4, 3, 3)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 3), indexing="ij"), dim=-1)
    feats = fourier_encode(grid, SMALL["max_freq"], SMALL["num_freq_bands"]).flatten(-2)  # [4, 3, 2·7]
    with torch.no_grad():
        expected = theirs.eval()(torch.cat([data, feats.expand(2, -1, -1, -1)], dim=-1))
        actual = ours(data)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_experimental_tied_schedule_drops_only_dead_sublayers(randomize) -> None:
    """depth 2 tied: layer 1 is the last, so its token-update sublayers are never run and are not converted."""
    kwargs = {**SMALL, "depth": 2, "input_axis": 1, "input_channels": 4, "fourier_encode_data": False}
    sd = randomize(lr_experimental.Perceiver(**kwargs)).state_dict()
    out = from_lucidrains_variant(sd)
    assert any(k.startswith("blocks.0.rev_cross_attn.") for k in out)
    assert not any(k.startswith(("blocks.1.rev_cross_attn.", "blocks.1.input_attn.", "blocks.1.norm_input."))
                   for k in out)


def test_unknown_key_raises(randomize) -> None:
    sd = dict(randomize(lr_gated.Perceiver(**SMALL, depth=1, input_axis=1, input_channels=2)).state_dict())
    sd["layers.0.7.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="layers.0.7.weight"):
        from_lucidrains_variant(sd)


@pytest.mark.parametrize("variant", ["experimental", "gated", "mixed_latents"])
def test_to_logits_is_the_variants_norm_and_linear(variant: str, randomize) -> None:
    """The variants pool before ``to_logits = Sequential(LayerNorm, Linear)`` (the core Perceiver pools inside
    it). Ours indexed as the core's: replacing the classifier as ``to_logits[1] = nn.Linear(D, n)`` put the
    Linear in place of the LayerNorm and failed in forward, and ``to_logits = nn.Identity()`` gave the latents
    [B, N, D] where the original gives the pooled [B, D]."""
    kwargs = {**SMALL, **next(k for v, k in CASES if v == variant)}
    theirs = _randomized(THEIRS[variant].Perceiver(**kwargs), randomize).eval()
    ours = OURS[variant](**kwargs).eval()
    ours.load_state_dict(from_lucidrains_variant(theirs.state_dict()), strict=True)
    for mine, original, kind in zip(ours.to_logits, theirs.to_logits, (torch.nn.LayerNorm, torch.nn.Linear)):
        assert isinstance(mine, kind) and isinstance(original, kind)
    assert len(ours.to_logits) == len(theirs.to_logits) == 2
    data = _data(kwargs)
    new = torch.nn.Linear(SMALL["latent_dim"], 7)
    theirs.to_logits[1] = ours.to_logits[1] = new
    with torch.no_grad():
        torch.testing.assert_close(ours(data), theirs(data), atol=1e-5, rtol=0)
        theirs.to_logits = ours.to_logits = torch.nn.Identity()
        assert ours(data).shape == (2, SMALL["latent_dim"])
        torch.testing.assert_close(ours(data), theirs(data), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapped_state_dicts_convert(prefix: str, randomize) -> None:
    """The state dict of a DDP-wrapped or torch.compile'd model (every key prefixed) converts as the bare one."""
    sd = randomize(lr_gated.Perceiver(**SMALL, depth=2, input_axis=1, input_channels=2)).state_dict()
    wrapped = {prefix + k: v for k, v in sd.items()}
    assert detect_variant(wrapped) == "gated"
    expected = from_lucidrains_variant(sd)
    actual = from_lucidrains_variant(wrapped)
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.parametrize("variant", ["experimental", "gated", "mixed_latents"])
def test_saved_state_dicts_load_with_load_checkpoint(variant: str, randomize, tmp_path) -> None:
    """A perceiver-pytorch variant saved with torch.save (bare, or as a Lightning-style ``model.`` checkpoint) loads
    through load_checkpoint: it failed with a bare KeyError (the file went to the core Perceiver's converter)."""
    import perceivers

    kwargs = {**SMALL, **next(k for v, k in CASES if v == variant)}
    theirs = _randomized(THEIRS[variant].Perceiver(**kwargs), randomize).eval()
    torch.save(theirs.state_dict(), tmp_path / "v.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "v.ckpt")
    data = _data(kwargs)
    for file in ("v.pt", "v.ckpt"):
        ours = perceivers.load_checkpoint(OURS[variant](**kwargs), tmp_path / file).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(ours(data), theirs(data), atol=1e-5, rtol=0)


def test_load_checkpoint_of_another_variant_names_both(randomize, tmp_path) -> None:
    import perceivers
    from perceivers.convert.state_dict import CheckpointError

    kwargs = {**SMALL, "depth": 2, "input_axis": 2, "input_channels": 3}
    torch.save(randomize(lr_gated.Perceiver(**kwargs)).state_dict(), tmp_path / "gated.pt")
    with pytest.raises(CheckpointError, match=r"gated\.pt.*MixedLatentsPerceiver.*layers\.0\.0\.fn\.fn\.to_q"):
        perceivers.load_checkpoint(MixedLatentsPerceiver(**kwargs), tmp_path / "gated.pt")
