"""Numerics: finite forward and backward in float32 / bfloat16 / float16 for every model, including fully
masked samples and extreme input scales; narrow (1-channel) contexts warn instead of silently collapsing.

CPU runs bfloat16 and float16 matmuls, so the tiny models run here in every dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _zoo import beyond_float16, multimodality, perceiver, perceiver_io, perceiver_lm, registry, variant

from perceivers import Perceiver, PerceiverIO, create_model, list_models
from perceivers.validation import MIN_NORMALISED_CHANNELS, NarrowContextWarning

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALES = [1.0, 1e4, 1e-4]

FAMILY = {"num_latents": 4, "latent_dim": 16, "cross_heads": 2, "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8,
              "num_classes": 3}


CASES = {
    "Perceiver": lambda: perceiver({**FAMILY, "depth": 2, "weight_tie_layers": True, "self_per_cross_attn": 1,
                                   "input_axis": 2, "input_channels": 3, "fourier_encode_data": True,
                                   "num_freq_bands": 3, "max_freq": 10.0, "inverted_cross_attn": False,
                                   "attn_residual": False}),
    "Perceiver-inverted-residual": lambda: perceiver({**FAMILY, "depth": 2, "weight_tie_layers": False,
                                                      "self_per_cross_attn": 2, "input_axis": 1, "input_channels": 4,
                                                      "fourier_encode_data": True, "num_freq_bands": 2,
                                                      "max_freq": 6.0, "inverted_cross_attn": True,
                                                      "attn_residual": True}),
    "PerceiverIO": lambda: perceiver_io({**{k: v for k, v in FAMILY.items() if k != "num_classes"}, "depth": 2,
                                         "weight_tie_layers": False, "dim": 6, "queries_dim": 8, "logits_dim": 3,
                                         "decoder_ff": True, "inverted_cross_attn": False, "attn_residual": False,
                                         "batched_queries": False}),
    "PerceiverIO-inverted": lambda: perceiver_io({**{k: v for k, v in FAMILY.items() if k != "num_classes"},
                                                  "depth": 1, "weight_tie_layers": True, "dim": 6, "queries_dim": 8,
                                                  "logits_dim": None, "decoder_ff": False, "inverted_cross_attn": True,
                                                  "attn_residual": True, "batched_queries": True}),
    "PerceiverLM": lambda: perceiver_lm({**{k: v for k, v in FAMILY.items() if k != "num_classes"}, "depth": 1,
                                         "dim": 8, "num_tokens": 11, "max_seq_len": 8}),
    "MultiModalityPerceiver": lambda: multimodality({**{k: v for k, v in FAMILY.items() if k != "num_classes"},
                                                     "depth": 2, "weight_tie_layers": True,
                                                     "num_latent_blocks_per_layer": 2, "use_gelu": False,
                                                     "num_classes": 3, "a_channels": 2, "b_channels": 3}),
    **{f"{kind}": (lambda kind=kind: variant({**FAMILY, "depth": 2, "weight_tie_layers": True, "input_axis": 2,
                                              "input_channels": 3, "fourier_encode_data": True, "num_freq_bands": 2,
                                              "max_freq": 6.0, "kind": kind}))
       for kind in ("gated", "mixed", "bottom_up")},
    **{name: (lambda name=name: registry(name)) for name in list_models()},
}


def _inputs(case, gen):
    inputs = case.make(None, 3, gen)
    if case.mask_key is not None:  # sample 0 sees everything, sample 1 half, sample 2 nothing
        mask = torch.ones_like(inputs[case.mask_key])
        mask.view(3, -1)[1, ::2] = False
        mask[2] = False
        inputs[case.mask_key] = mask
    return inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_are_finite(name, dtype):
    """Every scale (1, 1e4, 1e-4), with a fully masked sample where the model takes masks."""
    case = CASES[name]()
    model = case.model.to(dtype).train()
    for scale in SCALES:
        gen = torch.Generator().manual_seed(0)
        inputs = {k: (v * scale).to(dtype) if v.is_floating_point() else v for k, v in _inputs(case, gen).items()}
        if case.float_data:
            inputs[case.data_key].requires_grad_()
        model.zero_grad(set_to_none=True)
        out = case.run(model, inputs)
        assert out.dtype == dtype and out.shape[0] == 3
        if not torch.isfinite(out).all() and beyond_float16(case, inputs, dtype):
            continue  # the exact activations exceed float16's range: documented limit, see below
        assert torch.isfinite(out).all(), f"{name} {dtype} x{scale:g}: non-finite output"
        out.float().square().mean().backward()
        bad = [k for k, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"{name} {dtype} x{scale:g}: non-finite gradients {bad[:5]}"
        if case.float_data:
            assert torch.isfinite(inputs[case.data_key].grad).all()


@pytest.mark.parametrize("name", ["vision-perceiver-conv", "optical-flow-perceiver"])
def test_float16_limit_is_only_range(name):
    """The two models whose raw inputs meet a wide linear map before any normalisation (conv stem, flow patch
    Linear) are finite in float16 at input scale 1e3, inside float16's range, in training and eval mode."""
    case = registry(name)
    model = case.model.half()
    x = (case.make(None, 2, torch.Generator().manual_seed(0))["data"] * 1e3).half()
    for mode in (True, False):
        out = case.run(model.train(mode), {"data": x})
        assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ narrow inputs

NARROW = {"num_freq_bands": 2, "depth": 1, "max_freq": 4.0, "input_axis": 1, "num_latents": 4, "latent_dim": 8, "latent_heads": 1,
              "cross_dim_head": 4, "latent_dim_head": 4, "num_classes": 2}


def test_one_channel_context_warns_and_really_collapses():
    """The reason for the warning (krasserm/perceiver-io#14): a 1-channel context LayerNorm is constant."""
    with pytest.warns(NarrowContextWarning, match="context with 1 channel"):
        model = Perceiver(input_channels=1, fourier_encode_data=False, **NARROW).eval()
    x = torch.randn(4, 9, 1)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, out[:1].expand_as(out))  # four different inputs, one answer


def test_position_features_keep_one_channel_inputs_apart():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NarrowContextWarning)
        model = Perceiver(input_channels=1, fourier_encode_data=True, **NARROW).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 9, 1))
    assert (out - out[:1]).abs().amax() > 1e-3


@pytest.mark.parametrize("width", range(1, MIN_NORMALISED_CHANNELS + 1))
def test_warning_threshold(width):
    kw = {"depth": 1, "num_latents": 4, "latent_dim": 8, "latent_heads": 1, "cross_dim_head": 4, "latent_dim_head": 4}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PerceiverIO(dim=width, queries_dim=8, **kw)
        PerceiverIO(dim=8, queries_dim=width, **kw)
    narrow = [w for w in caught if issubclass(w.category, NarrowContextWarning)]
    if width < MIN_NORMALISED_CHANNELS:
        assert {"context" in str(w.message) for w in narrow} == {True, False}  # one for data, one for queries
        assert all(w.filename == __file__ for w in narrow)  # points at the user's line, not at perceivers
    else:
        assert not narrow


@pytest.mark.parametrize("name", list_models())
def test_official_models_do_not_warn(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NarrowContextWarning)
        create_model(name, tiny=True)
        with torch.device("meta"):
            create_model(name)
