"""Parity with transformers' Perceiver heads: their checkpoints load into our registry models.

Each test builds a tiny random transformers model, ``save_pretrained``s it to a temporary directory,
loads it with :func:`perceivers.convert.transformers.from_transformers` and compares outputs:

- with ``numerics="transformers"`` (exact GELU, transformers' conv stem, its learned-decoder residual)
  the outputs must agree within 1e-5 for all six heads;
- with the default DeepMind numerics, where transformers departs from the official model, the expected
  values are derived from the official definitions (tanh GELU, TF-SAME stem, swapped-back kernel,
  no learned-decoder residual).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from _transformers_models import CONFIGS, checkpoint_factory, edited_copy, randomize
from _transformers_models import inputs as _inputs

from perceivers.convert.state_dict import CheckpointError
from perceivers.convert.transformers import (
    convert_transformers_state_dict,
    from_transformers,
    save_transformers,
    to_transformers_state_dict,
)
from perceivers.layers import FeedForward
from perceivers.tasks import create_model

ATOL = 1e-5
MAX_ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """architecture → (transformers model, directory it was saved to)."""
    return checkpoint_factory(tmp_path_factory)


def _run_hf(model, arch, inputs):
    with torch.no_grad():
        if arch == "PerceiverForMultimodalAutoencoding":
            points = {"image": torch.arange(64, 128), "audio": torch.arange(2, 4), "label": None}
            return model(inputs=inputs["inputs"], subsampled_output_points=points).logits
        return model(**inputs).logits


def _run_ours(model, arch, inputs):
    with torch.no_grad():
        if arch == "PerceiverForMultimodalAutoencoding":
            points = {"image": torch.arange(64, 128), "audio": torch.arange(2, 4)}
            return model(inputs["inputs"], subsampled_output_points=points).logits
        if arch == "PerceiverForMaskedLM":
            return model(inputs["inputs"], attention_mask=inputs["attention_mask"]).logits
        if arch == "PerceiverForOpticalFlow":
            return model(inputs["inputs"]).logits
        return model(inputs["pixel_values"]).logits


def _max_error(a, b) -> float:
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        return max(_max_error(a[k], b[k]) for k in a)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_transformers_numerics_match(hf_checkpoint, arch):
    hf, directory = hf_checkpoint(arch)
    ours = from_transformers(directory, numerics="transformers")
    inputs = _inputs(arch)
    err = _max_error(_run_ours(ours, arch, inputs), _run_hf(hf, arch, inputs))
    MAX_ERRORS[arch] = err
    assert err < ATOL, f"{arch}: max |ours - transformers| = {err:.3g}"


def test_masked_lm_padding_matches_at_real_positions(hf_checkpoint):
    arch = "PerceiverForMaskedLM"
    hf, directory = hf_checkpoint(arch)
    ours = from_transformers(directory, numerics="transformers")
    inputs = _inputs(arch)
    inputs["attention_mask"][1, 10:] = 0
    got, want = _run_ours(ours, arch, inputs), _run_hf(hf, arch, inputs)
    real = inputs["attention_mask"].bool()
    assert _max_error(got[real], want[real]) < ATOL
    # transformers ignores the decoder query mask, and so do transformers' numerics (decoder_query_mask=False)
    assert _max_error(got[~real], want[~real]) < ATOL
    # DeepMind zeroes the attention of fully masked query rows
    ours.config.decoder_query_mask = True
    got = _run_ours(ours, arch, inputs)
    assert _max_error(got[real], want[real]) < ATOL
    assert not torch.allclose(got[~real], want[~real], atol=1e-3)


def _gelu_exact_everywhere(model):
    for m in model.modules():
        if isinstance(m, FeedForward):
            m.activation = "gelu"


@pytest.mark.parametrize("arch", [a for a in CONFIGS if not a.endswith(("ConvProcessing", "Learned"))])
def test_deepmind_numerics_differ_from_transformers_only_by_gelu(hf_checkpoint, arch):
    """Heads where transformers' architecture equals DeepMind's: the default load equals the compat load
    once exact GELU is swapped in, and with tanh GELU it differs by a small amount."""
    _, directory = hf_checkpoint(arch)
    official = from_transformers(directory)
    compat = from_transformers(directory, numerics="transformers")
    inputs = _inputs(arch)
    tanh_err = _max_error(_run_ours(official, arch, inputs), _run_ours(compat, arch, inputs))
    assert 0 < tanh_err < 0.05
    _gelu_exact_everywhere(official)
    assert _max_error(_run_ours(official, arch, inputs), _run_ours(compat, arch, inputs)) == 0


def test_learned_decoder_has_no_query_residual_in_deepmind_numerics(hf_checkpoint):
    arch = "PerceiverForImageClassificationLearned"
    hf, directory = hf_checkpoint(arch)
    official = from_transformers(directory)
    assert official.config.decoder_query_residual is False
    _gelu_exact_everywhere(official)
    inputs = _inputs(arch)
    # expected: transformers' own decoder with the query residual removed (DeepMind colab: use_query_residual=False)
    hf.perceiver.decoder.decoder.decoding_cross_attention.use_query_residual = False
    hf.perceiver.decoder.decoder.decoding_cross_attention.attention.use_query_residual = False
    try:
        want = _run_hf(hf, arch, inputs)
    finally:
        hf.perceiver.decoder.decoder.decoding_cross_attention.use_query_residual = True
        hf.perceiver.decoder.decoder.decoding_cross_attention.attention.use_query_residual = True
    assert _max_error(_run_ours(official, arch, inputs), want) < ATOL


def test_conv_stem_follows_official_definition(hf_checkpoint):
    """DeepMind numerics: kernel H/W swapped back, TF-SAME padding (2/3) and a −inf padded max-pool."""
    arch = "PerceiverForImageClassificationConvProcessing"
    hf, directory = hf_checkpoint(arch)
    official = from_transformers(directory)
    hf_conv = hf.perceiver.input_preprocessor.convnet
    ours_conv = official.perceiver.input_preprocessor.stem.layers[0].conv
    assert torch.equal(ours_conv.weight, hf_conv.conv.weight.transpose(-1, -2))
    x = _inputs(arch)["pixel_values"]  # [2, 3, 16, 20]
    # official stem from its definition (official.md §4.4)
    y = F.conv2d(F.pad(x, (2, 3, 2, 3)), hf_conv.conv.weight.transpose(-1, -2), stride=2)
    bn = hf_conv.batchnorm
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    y = F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])
    want_tokens = F.max_pool2d(F.pad(y, (0, 1, 0, 1), value=float("-inf")), 3, 2)  # [2, 64, 4, 5]
    with torch.no_grad():
        prep = official.perceiver.input_preprocessor(x)
    got_tokens = prep[2] if isinstance(prep, tuple) else prep.inputs_without_pos
    assert want_tokens.shape[-2:] == (4, 5)
    torch.testing.assert_close(got_tokens, want_tokens.flatten(2).transpose(1, 2), atol=1e-5, rtol=0)
    # trunk: transformers' encoder/decoder fed with the official tokens equal our output (exact GELU)
    _gelu_exact_everywhere(official)
    with torch.no_grad():
        tokens = prep[0] if isinstance(prep, tuple) else prep.inputs
        saved, d_model = hf.perceiver.input_preprocessor, hf.config.d_model
        hf.perceiver.input_preprocessor, hf.config.d_model = None, tokens.shape[-1]
        try:
            want = hf.perceiver(tokens).logits
        finally:
            hf.perceiver.input_preprocessor, hf.config.d_model = saved, d_model
    assert _max_error(_run_ours(official, arch, {"pixel_values": x}), want) < ATOL


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_round_trip_to_transformers_format(hf_checkpoint, arch, tmp_path):
    """transformers → ours → transformers: with transformers' numerics the same model again; with DeepMind's
    (kernel swapped back, tanh GELU) the same weights, written with the activation the model computes."""
    hf, directory = hf_checkpoint(arch)
    inputs = _inputs(arch)
    want = hf.state_dict()
    for numerics, act in (("transformers", hf.config.hidden_act), ("deepmind", "gelu_new")):
        save_transformers(from_transformers(directory, numerics=numerics), tmp_path / numerics)
        again = getattr(transformers, arch).from_pretrained(tmp_path / numerics).eval()
        assert all(torch.equal(v, want[k]) for k, v in again.state_dict().items()), numerics
        cfg = json.loads((tmp_path / numerics / "config.json").read_text())
        assert cfg["architectures"] == [arch] and cfg["model_type"] == "perceiver"
        assert cfg["hidden_act"] == act, numerics
    # Bit-identical weights; outputs may differ in the last ulp, because transformers computes on the
    # memory-mapped tensors, whose alignment depends on the safetensors header length.
    again = getattr(transformers, arch).from_pretrained(tmp_path / "transformers").eval()
    assert _max_error(_run_hf(again, arch, inputs), _run_hf(hf, arch, inputs)) <= 1e-6


def test_key_tables_are_strict():
    with pytest.raises(CheckpointError, match="no rule"):
        convert_transformers_state_dict({"perceiver.something.else": torch.zeros(1)}, "PerceiverForOpticalFlow")
    model = create_model("optical-flow-perceiver", tiny=True)
    back = convert_transformers_state_dict(to_transformers_state_dict(model.state_dict(), "PerceiverForOpticalFlow"),
                                           "PerceiverForOpticalFlow")
    assert back.keys() == model.state_dict().keys()


def test_report_max_errors():
    """Prints the measured parity errors (run with -s)."""
    for arch, err in sorted(MAX_ERRORS.items()):
        print(f"{arch}: max |ours - transformers| = {err:.2e}")


def test_multimodal_video_frequencies_follow_the_patch_grid():
    """transformers sets the video Fourier max_resolution from config.image_size, DeepMind from the 4× patch
    grid; they agree for the released checkpoint (56 = 224 / 4). Other values load with the official grid and
    cannot be reproduced in transformers numerics."""
    from perceivers.convert.transformers import overrides_from_config

    cfg = {"model_type": "perceiver", **CONFIGS["PerceiverForMultimodalAutoencoding"], "image_size": 8}
    name, over = overrides_from_config(cfg, "PerceiverForMultimodalAutoencoding")
    assert name == "multimodal-perceiver" and over["image_size"] == (8, 8) and over["image_patch_size"] == 4
    with pytest.raises(ValueError, match="patch grid"):
        overrides_from_config(cfg, "PerceiverForMultimodalAutoencoding", numerics="transformers")


def test_pytorch_model_bin_and_sharded_checkpoints(hf_checkpoint, tmp_path):
    """``pytorch_model.bin`` (read with weights_only=True) and sharded ``*.index.json`` checkpoints load too."""
    from safetensors.torch import load_file

    arch = "PerceiverForOpticalFlow"
    _, directory = hf_checkpoint(arch)
    state = load_file(directory / "model.safetensors")
    want = _run_ours(from_transformers(directory), arch, _inputs(arch))
    single, sharded = tmp_path / "bin", tmp_path / "sharded"
    for d in (single, sharded):
        d.mkdir()
        (d / "config.json").write_text((directory / "config.json").read_text())
    torch.save(state, single / "pytorch_model.bin")
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for shard, names in halves.items():
        torch.save({k: state[k] for k in names}, sharded / shard)
    index = {"weight_map": {k: shard for shard, names in halves.items() for k in names}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for d in (single, sharded):
        assert _max_error(_run_ours(from_transformers(d), arch, _inputs(arch)), want) == 0


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_transformers_numerics_survive_save_pretrained(hf_checkpoint, arch, tmp_path):
    """The activation, the learned decoder residual and the conv stem's padding are config fields, so a
    compat model saved in our format still reproduces transformers (the conv stem used to be a run-time
    switch: reloaded, it padded as DeepMind does with a kernel in transformers' orientation)."""
    from perceivers import from_pretrained, save_pretrained

    hf, directory = hf_checkpoint(arch)
    compat = from_transformers(directory, numerics="transformers")
    assert compat.config.hidden_act == "gelu"
    if arch.endswith("Learned"):
        assert compat.config.decoder_query_residual is True
    if arch.endswith("ConvProcessing"):
        assert compat.config.conv_padding == "symmetric"
    save_pretrained(compat, tmp_path)
    inputs = _inputs(arch)
    assert _max_error(_run_ours(from_pretrained(tmp_path), arch, inputs), _run_hf(hf, arch, inputs)) < ATOL

@pytest.fixture(scope="module")
def hf_q_checkpoint(tmp_path_factory):
    """architecture → a checkpoint with ``cross_attention_shape_for_attention="q"`` (every head)."""
    return checkpoint_factory(tmp_path_factory, {a: dict(c, cross_attention_shape_for_attention="q")
                                                 for a, c in CONFIGS.items()})


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_query_shaped_cross_attention_loads_in_every_head(hf_q_checkpoint, arch):
    """transformers applies ``cross_attention_shape_for_attention="q"`` to every cross-attention without
    explicit widths, the flow and multimodal decoders' included (their queries are wider than the
    latents): both numerics load such a checkpoint, transformers' reproduces its outputs."""
    hf, directory = hf_q_checkpoint(arch)
    inputs = _inputs(arch)
    from_transformers(directory)  # DeepMind numerics: the same shapes
    err = _max_error(_run_ours(from_transformers(directory, numerics="transformers"), arch, inputs),
                     _run_hf(hf, arch, inputs))
    assert err < ATOL, f"{arch}: max |ours - transformers| = {err:.3g}"


@pytest.mark.parametrize(("arch", "field", "value", "expected"), [
    ("PerceiverForImageClassificationFourier", "num_latents", "8", "an int"),
    ("PerceiverForImageClassificationFourier", "d_latents", "32", "an int"),
    ("PerceiverForImageClassificationFourier", "num_blocks", 2.0, "an int"),
    ("PerceiverForImageClassificationFourier", "qk_channels", True, "an int or null"),
    ("PerceiverForImageClassificationFourier", "use_query_residual", "false", "a bool"),
    ("PerceiverForImageClassificationFourier", "output_hidden_states", "true", "a bool"),
    ("PerceiverForImageClassificationFourier", "attention_probs_dropout_prob", "0.1", "a number"),
    ("PerceiverForOpticalFlow", "train_size", [6, "8"], "a list of 2 ints"),
    ("PerceiverForMaskedLM", "vocab_size", "262", "an int"),
])
def test_config_values_of_the_wrong_type_are_named(hf_checkpoint, tmp_path, arch, field, value, expected):
    """A size given as a string (or a bool as a string, …) fails at load, naming the field, the type and the
    value, with either numerics, from the head names and from PerceiverConfig.from_pretrained (it used to
    fail deep inside torch, or load as something else: ``"false"`` is true)."""
    from perceivers import hf as phf

    _, directory = hf_checkpoint(arch)
    directory = edited_copy(directory, tmp_path, **{field: value})
    message = rf"config field '{field}' must be {expected}, got {value!r} \({type(value).__name__}\)".replace("[", r"\[")
    for numerics in ("deepmind", "transformers"):
        with pytest.raises(TypeError, match=message):
            from_transformers(directory, numerics=numerics)
    with pytest.raises(TypeError, match=message):
        getattr(phf, arch).from_pretrained(directory)
    with pytest.raises(TypeError, match=message):
        phf.PerceiverConfig.from_pretrained(directory)


def test_every_config_field_has_its_type_checked():
    import dataclasses

    from perceivers.hf_config import PerceiverConfig, check_field_types

    for f in dataclasses.fields(PerceiverConfig):
        if f.name != "extra":
            with pytest.raises(TypeError, match=f"config field '{f.name}' must be"):
                check_field_types({f.name: object()})
    check_field_types(PerceiverConfig().to_dict())  # transformers' defaults pass
    check_field_types(transformers.PerceiverConfig(train_size=(6, 8)).to_dict())


def test_reloading_keeps_the_kernel_orientation_of_the_model(hf_checkpoint, tmp_path):
    """``load_checkpoint`` (a transformers directory or its bare ``model.safetensors``) orients the conv stem's
    kernel as the model computes: swapped back for DeepMind's stem, as stored for transformers' (a model
    loaded with ``numerics="transformers"`` used to get the swapped kernel on a reload: outputs off by 0.2)."""
    from perceivers import load_checkpoint

    arch = "PerceiverForImageClassificationConvProcessing"
    hf, directory = hf_checkpoint(arch)
    inputs = _inputs(arch)
    want = _run_hf(hf, arch, inputs)
    for source in (directory, directory / "model.safetensors"):
        compat = from_transformers(directory, numerics="transformers")
        load_checkpoint(compat, source)
        assert _max_error(_run_ours(compat, arch, inputs), want) < ATOL, source
        official = from_transformers(directory)
        expected = _run_ours(official, arch, inputs)
        load_checkpoint(official, source)
        assert _max_error(_run_ours(official, arch, inputs), expected) == 0, source


@pytest.mark.parametrize("arch", ["PerceiverForImageClassificationFourier", "PerceiverForMaskedLM",
                                  "PerceiverForOpticalFlow"])
def test_decoder_mlps_do_not_widen_with_the_encoder(arch, tmp_path):
    """transformers' ``cross_attention_widening_factor`` widens the encoder's cross-attention MLP only; its task
    decoders keep a 1× MLP, as DeepMind's and ours (docs/checkpoints.md listed this as a difference)."""
    torch.manual_seed(0)
    cfg = dict(CONFIGS[arch], cross_attention_widening_factor=3, self_attention_widening_factor=2)
    hf = getattr(transformers, arch)(transformers.PerceiverConfig(**cfg)).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    decoder = hf.perceiver.decoder if arch == "PerceiverForMaskedLM" else hf.perceiver.decoder.decoder
    mlp = decoder.decoding_cross_attention.mlp.dense1
    assert mlp.out_features == mlp.in_features
    encoder_mlp = hf.perceiver.encoder.cross_attention.mlp.dense1
    assert encoder_mlp.out_features == 3 * encoder_mlp.in_features
    inputs = _inputs(arch)
    assert _max_error(_run_ours(from_transformers(tmp_path, numerics="transformers"), arch, inputs),
                      _run_hf(hf, arch, inputs)) < ATOL
