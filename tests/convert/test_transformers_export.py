"""Writing registry models in transformers' format when their config leaves a field at its default (None).

``None`` means "the default" in our configs (``max_resolution`` = the token grid, the MLM decoder's
``decoder_qk_channels`` = ``qk_channels`` and ``decoder_v_channels`` = ``d_model``); for the official
sizes that default is exactly what transformers hard-codes, so these models must convert, and
transformers must then compute what we compute. Models transformers cannot build (other attention
widths, fields its heads hard-code) are refused, naming the values, and nothing is written.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from perceivers import save_pretrained
from perceivers.commands import convert
from perceivers.convert.transformers import from_transformers, transformers_config, use_transformers_numerics
from perceivers.tasks import create_model

ATOL = 1e-5
TRUNK = {"num_latents": 8, "d_latents": 32, "num_blocks": 1, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "num_cross_attention_heads": 1}

# Small trunks; every field transformers fixes is left at our default (no max_resolution, no decoder sizes).
CASES = {
    "vision-perceiver-conv": (dict(TRUNK, num_labels=5), "PerceiverForImageClassificationConvProcessing"),
    "vision-perceiver-fourier": (dict(TRUNK, num_labels=5), "PerceiverForImageClassificationFourier"),
    "language-perceiver": ({"num_latents": 6, "d_latents": 24, "num_self_attends_per_block": 2,
                            "num_self_attention_heads": 2, "num_cross_attention_heads": 2, "v_channels": 24,
                            "d_model": 16, "max_position_embeddings": 16}, "PerceiverForMaskedLM"),
}
DEFAULTED = {"vision-perceiver-conv": ("max_resolution",), "vision-perceiver-fourier": ("max_resolution",),
             "language-perceiver": ("decoder_qk_channels", "decoder_v_channels")}


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if name == "language-perceiver":
        return torch.randint(0, 262, (2, 16), generator=g)
    if name == "vision-perceiver-conv":
        return torch.randn(2, 3, 32, 28, generator=g)
    return torch.randn(2, 3, 12, 10, generator=g)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).logits


def _model(name, randomize):
    model = randomize(create_model(name, **CASES[name][0]), seed=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_defaulted_fields_convert_and_match_transformers(name, randomize, tmp_path, capsys):
    model = _model(name, randomize)
    assert all(getattr(model.config, k) is None for k in DEFAULTED[name])  # the case that used to be refused
    src, dst = save_pretrained(model, tmp_path / "ours"), tmp_path / "hf"
    assert convert.main([str(src), str(dst), "--to", "transformers"]) == 0, capsys.readouterr().err
    x = _input(name)
    # back into our format: the same model (DeepMind numerics, conv kernel swapped back)
    assert torch.equal(_logits(from_transformers(dst), x), _logits(model, x))

    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, CASES[name][1]).from_pretrained(dst).eval()
    with torch.no_grad():
        want = hf(x).logits
    # transformers' computation, reproduced from the written checkpoint
    err = (_logits(from_transformers(dst, numerics="transformers"), x) - want).abs().max().item()
    assert err < ATOL, f"{name}: max |ours - transformers| = {err:.3g}"
    if name != "vision-perceiver-conv":  # no stem: the written model (tanh GELU, "gelu_new") is ours as it is
        err = (_logits(model, x) - want).abs().max().item()
        assert err < ATOL, f"{name}: max |ours - transformers| = {err:.3g}"
    else:  # transformers' stem: our model with its padding and the kernel as written is transformers' model
        ours = use_transformers_numerics(copy.deepcopy(model), "gelu_new")
        ours.load_state_dict(from_transformers(dst, numerics="transformers").state_dict())
        err = (_logits(ours, x) - want).abs().max().item()
        assert err < ATOL, f"{name}: max |ours - transformers| = {err:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_official_sizes_are_expressible(name):
    """The full-size registry models (built on the meta device: only the config matters) convert."""
    with torch.device("meta"):
        model = create_model(name)
    cfg = transformers_config(model)
    assert cfg["architectures"] == [CASES[name][1]]


def test_resolved_defaults_that_differ_are_still_refused():
    with torch.device("meta"):
        conv = create_model("vision-perceiver-conv", image_size=112)
        flow = create_model("optical-flow-perceiver", max_resolution=(10, 10))
        lm = create_model("language-perceiver", qk_channels=128)
    with pytest.raises(ValueError, match=r"max_resolution=\(56, 56\) \(model has None, i\.e\. \(28, 28\)\)"):
        transformers_config(conv)
    # transformers takes the flow model's Fourier frequencies from train_size
    with pytest.raises(ValueError, match=r"max_resolution=\(368, 496\) \(model has \(10, 10\)\)"):
        transformers_config(flow)
    with pytest.raises(ValueError, match=r"decoder_qk_channels=256 \(model has None, i\.e\. 128\)"):
        transformers_config(lm)


# transformers' self-attention projects its values to v_channels (not d_latents) and adds them to the latents, and its
# encoder needs d_latents divisible by the cross-attention heads: our models that differ cannot load there
@pytest.mark.parametrize("name, over, message", [
    ("language-perceiver", {"d_model": 16, "max_position_embeddings": 16},  # v_channels 1280, the official default
     r"v_channels=32 \(= d_latents, its self-attentions' output width; model has 1280\)"),
    ("vision-perceiver-fourier", {"v_channels": 64}, r"v_channels=32 \(.*model has 64\)"),
    ("vision-perceiver-fourier", {"qk_channels": 8}, r"v_channels=32 \(.*model has None, i\.e\. 8\)"),
    ("vision-perceiver-fourier", {"num_cross_attention_heads": 3},
     r"num_cross_attention_heads dividing d_latents=32 \(model has 3\)"),
])
def test_inexpressible_attention_widths_are_refused(name, over, message, tmp_path, capsys):
    src, dst = save_pretrained(create_model(name, **{**TRUNK, **over}), tmp_path / "ours"), tmp_path / "hf"
    assert convert.main([str(src), str(dst), "--to", "transformers"]) == 2
    assert re.search("cannot be written in transformers' format: transformers fixes .*" + message,
                     capsys.readouterr().err)
    assert not dst.exists()


@pytest.mark.parametrize("name, over, message", [
    ("vision-perceiver-conv", {"decoder_query_channels": 16}, "decoder_query_channels=1024 (model has 16)"),
    ("vision-perceiver-learned", {"in_channels": 4}, "in_channels=3 (model has 4)"),
    ("vision-perceiver-fourier", {"spatial_downsample": 2}, "spatial_downsample=1 (model has 2)"),
    ("optical-flow-perceiver", {"num_decoder_heads": 2}, "num_decoder_heads=1 (model has 2)"),
    ("optical-flow-perceiver", {"rescale_factor": 50.0}, "rescale_factor=100.0 (model has 50.0)"),
    ("multimodal-perceiver", {"decoder_query_residual": True}, "decoder_query_residual=False (model has True)"),
])
def test_hard_coded_fields_are_refused(name, over, message):
    with torch.device("meta"):
        model = create_model(name, **over)
    with pytest.raises(ValueError, match=re.escape(message)):
        transformers_config(model)


def test_value_width_d_latents_converts_and_matches_transformers(randomize, tmp_path, capsys):
    """qk_channels may differ from d_latents as long as v_channels is d_latents."""
    model = randomize(create_model("vision-perceiver-fourier", **TRUNK, num_labels=5, qk_channels=8, v_channels=32),
                      seed=2).eval()
    src, dst = save_pretrained(model, tmp_path / "ours"), tmp_path / "hf"
    assert convert.main([str(src), str(dst), "--to", "transformers"]) == 0, capsys.readouterr().err
    x = _input("vision-perceiver-fourier")
    assert torch.equal(_logits(from_transformers(dst), x), _logits(model, x))
    transformers = pytest.importorskip("transformers")
    hf = transformers.PerceiverForImageClassificationFourier.from_pretrained(dst).eval()
    with torch.no_grad():
        err = (_logits(model, x) - hf(x).logits).abs().max().item()
    assert err < ATOL, f"max |ours - transformers| = {err:.3g}"
