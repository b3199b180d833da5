"""transformers' generic ``PerceiverModel`` and its building blocks (``perceivers.hf``), against transformers.

Each case builds transformers' ``PerceiverModel`` from a combination of its blocks at tiny sizes, makes every
tensor random (norms, biases, tables included, so a skipped tensor fails), builds ours from the same
constructor calls with ``numerics="transformers"``, loads transformers' state dict into it and compares
logits, the latents, every hidden state, attention and cross-attention. Then ours is re-randomised, written
back with ``transformers_state_dict()`` (loaded strictly by transformers) and compared again: both directions.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _transformers_models import randomize
from transformers.models.perceiver import modeling_perceiver as tm

from perceivers import hf as phf
from perceivers.convert.state_dict import CheckpointError

ATOL = 1e-5
ERRORS: dict[str, float] = {}
TRUNK = {"num_latents": 6, "d_latents": 16, "num_blocks": 2, "num_self_attends_per_block": 2,
         "num_self_attention_heads": 2, "num_cross_attention_heads": 1, "attention_probs_dropout_prob": 0.0}



def _pair(config_kw, make, *, seed=0, numerics="transformers"):
    """(transformers model, ours), both in eval mode, ours holding transformers' random weights."""
    torch.manual_seed(0)
    hf_cfg = transformers.PerceiverConfig(**config_kw)
    hf = tm.PerceiverModel(hf_cfg, **make(tm, hf_cfg))
    randomize(hf.eval(), seed)
    cfg = phf.PerceiverConfig(**config_kw)
    ours = phf.PerceiverModel(cfg, **make(phf, cfg), numerics=numerics).eval()
    ours.load_transformers_state_dict(hf.state_dict())
    return hf, ours


def _diff(a, b) -> float:
    if a is None or b is None:
        assert a is None and b is None, (type(a), type(b))
        return 0.0
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        return max(_diff(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{len(a)} tensors, transformers {len(b)}"
        return max((_diff(x, y) for x, y in zip(a, b)), default=0.0)
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return float((a.detach() - b.detach()).abs().max())


FIELDS = ("logits", "last_hidden_state", "hidden_states", "attentions", "cross_attentions")


def _compare(name, hf, ours, kw, *, fields=FIELDS):
    """Run both on ``kw`` with every output requested; assert and record the largest difference."""
    with torch.no_grad():
        theirs = hf(**kw, output_attentions=True, output_hidden_states=True)
        mine = ours(**kw, output_attentions=True, output_hidden_states=True)
    worst = 0.0
    for f in fields:
        err = _diff(getattr(mine, f), getattr(theirs, f))
        assert err < ATOL, f"{name}.{f}: max |ours - transformers| = {err:.3g}"
        worst = max(worst, err)
    ERRORS[name] = max(worst, ERRORS.get(name, 0.0))
    return mine, theirs


def _both_directions(name, config_kw, make, kw, **pair_kw):
    """transformers → ours, compare; ours re-randomised → transformers (strict), compare."""
    hf, ours = _pair(config_kw, make, **pair_kw)
    _compare(name, hf, ours, kw)
    randomize(ours, seed=7)
    hf.load_state_dict(ours.transformers_state_dict(), strict=True)
    _compare(name, hf, ours, kw)
    return hf, ours


def _classifier(ns, c, **kw):
    return ns.PerceiverClassificationDecoder(
        c, num_channels=c.d_latents, use_query_residual=True,
        trainable_position_encoding_kwargs={"num_channels": c.d_latents, "index_dims": 1}, **kw)


def _one_hot(ns, c):
    """The one-hot preprocessor; transformers' own cannot stand alone in its PerceiverModel (its forward lacks
    ``interpolate_pos_encoding``), so that keyword is dropped for it here (ours needs no such help)."""
    pre = ns.PerceiverOneHotPreprocessor(c)
    if ns is tm:
        pre.forward = lambda inputs, interpolate_pos_encoding=False: tm.PerceiverOneHotPreprocessor.forward(pre, inputs)
    return pre


# ----------------------------------------------------------------------------------------------- cases


def test_no_preprocessor_no_decoder():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    kw = {"inputs": torch.randn(2, 7, 12, generator=g), "attention_mask": mask}
    _, ours = _both_directions("no preprocessor, no decoder", dict(TRUNK, d_model=12), lambda ns, c: {}, kw)
    out = ours(**kw)
    assert out.logits is None and out.hidden_states is None and out.attentions is None
    assert ours(**kw, return_dict=False)[0].shape == (2, 6, 16)


def test_text_basic_and_embedding_decoder():
    """MLM-like: text preprocessor, per-position trainable queries without a final layer, tied output."""
    cfg_kw = dict(TRUNK, d_model=12, max_position_embeddings=10, num_cross_attention_heads=2, qk_channels=8,
                  v_channels=16)

    def make(ns, c):
        return {"input_preprocessor": ns.PerceiverTextPreprocessor(c),
                "decoder": ns.PerceiverBasicDecoder(
                    c, output_num_channels=c.d_latents, output_index_dims=c.max_position_embeddings,
                    num_channels=c.d_model, qk_channels=8, v_channels=c.d_model, num_heads=2,
                    use_query_residual=False, final_project=False,
                    trainable_position_encoding_kwargs={"num_channels": c.d_model,
                                                        "index_dims": c.max_position_embeddings})}

    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0
    kw = {"inputs": torch.randint(0, 262, (2, 10), generator=g), "attention_mask": mask}
    hf, ours = _both_directions("text + basic decoder", cfg_kw, make, kw)
    hf_emb = tm.PerceiverEmbeddingDecoder(hf.config)
    randomize(hf_emb, 3)
    our_emb = phf.PerceiverEmbeddingDecoder(ours.config)
    our_emb.load_state_dict(hf_emb.state_dict())
    with torch.no_grad():
        theirs = hf_emb(hf(**kw).logits, embedding_layer=hf.input_preprocessor.embeddings)
        mine = our_emb(ours(**kw).logits, embedding_layer=ours.input_preprocessor.embeddings)
    assert mine.shape == (2, 10, 262)
    err = _diff(mine, theirs)
    assert err < ATOL
    ERRORS["text + embedding decoder logits"] = err


_FOURIER = {"num_bands": 3, "max_resolution": (4, 5), "concat_pos": True, "sine_only": False}
IMAGE_CASES = {
    # name: (PerceiverImagePreprocessor keywords, image [B, C, H, W])
    "conv + fourier concat": ({"prep_type": "conv", "spatial_downsample": 1, "out_channels": 8,
                               "fourier_position_encoding_kwargs": _FOURIER}, (2, 3, 16, 20)),
    "conv1x1 + trainable concat, projected": (
        {"prep_type": "conv1x1", "spatial_downsample": 1, "out_channels": 8, "position_encoding_type": "trainable",
         "project_pos_dim": 10, "trainable_position_encoding_kwargs": {"num_channels": 8, "index_dims": 36}},
        (2, 3, 6, 6)),
    "conv1x1 stride 2 + trainable add": (
        {"prep_type": "conv1x1", "spatial_downsample": 2, "out_channels": 8, "position_encoding_type": "trainable",
         "concat_or_add_pos": "add", "trainable_position_encoding_kwargs": {"num_channels": 8, "index_dims": 12}},
        (2, 3, 6, 8)),
    "patches + fourier concat": ({"prep_type": "patches", "spatial_downsample": 2,
                                  "fourier_position_encoding_kwargs": _FOURIER}, (2, 3, 8, 6)),
    "patches + linear + fourier add": (
        {"prep_type": "patches", "spatial_downsample": 2, "conv_after_patching": True,
         "conv_after_patching_in_channels": 12, "out_channels": 10, "concat_or_add_pos": "add",
         "fourier_position_encoding_kwargs": dict(_FOURIER, num_bands=2)}, (2, 3, 8, 6)),
    "pixels + fourier concat": ({"prep_type": "pixels", "spatial_downsample": 1,
                                 "fourier_position_encoding_kwargs": dict(_FOURIER, sine_only=True)}, (2, 3, 5, 4)),
    "pixels + trainable add": (
        {"prep_type": "pixels", "spatial_downsample": 1, "position_encoding_type": "trainable",
         "concat_or_add_pos": "add", "trainable_position_encoding_kwargs": {"num_channels": 3, "index_dims": 20}},
        (2, 3, 5, 4)),
    "pixels + fourier, projected": (
        {"prep_type": "pixels", "spatial_downsample": 1, "out_channels": 14, "project_pos_dim": 6,
         "fourier_position_encoding_kwargs": dict(_FOURIER, num_bands=3)}, (2, 3, 5, 4)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # 3-channel pixels added to positions
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_image_preprocessor(case):
    pre_kw, shape = IMAGE_CASES[case]

    def make(ns, c):
        return {"input_preprocessor": ns.PerceiverImagePreprocessor(c, **pre_kw), "decoder": _classifier(ns, c)}

    g = torch.Generator().manual_seed(3)
    _both_directions(f"image {case}", dict(TRUNK, num_labels=5), make, {"inputs": torch.randn(*shape, generator=g)})


def test_interpolate_pos_encoding():
    """A 6x6 learned position table resized to the 8x10 grid of a larger image, as transformers does."""
    pre_kw, _ = IMAGE_CASES["conv1x1 + trainable concat, projected"]

    def make(ns, c):
        return {"input_preprocessor": ns.PerceiverImagePreprocessor(c, **pre_kw), "decoder": _classifier(ns, c)}

    x = torch.randn(2, 3, 8, 10, generator=torch.Generator().manual_seed(3))
    hf, ours = _pair(dict(TRUNK, num_labels=5), make)
    _compare("image interpolate_pos_encoding", hf, ours, {"inputs": x, "interpolate_pos_encoding": True})
    with pytest.raises(ValueError, match=r"built for index shape \(36,\)"):
        ours(inputs=x)  # the flag is off again


def test_one_hot_preprocessor():
    def make(ns, c):
        return {"input_preprocessor": _one_hot(ns, c), "decoder": _classifier(ns, c)}

    labels = torch.nn.functional.one_hot(torch.tensor([1, 4]), 5).float()
    _both_directions("one-hot", dict(TRUNK, num_labels=5), make, {"inputs": labels})


MM_CONFIG = dict(TRUNK, num_frames=2, audio_samples_per_frame=16, samples_per_patch=8, image_size=2,
                 output_shape=(1, 2, 8, 8), num_labels=5, output_num_channels=10, _label_trainable_num_channels=12)


def _multimodal(mask_probs):
    """transformers' multimodal autoencoder assembled by hand at tiny sizes (its constructor calls)."""

    def make(ns, c):
        n_audio = c.num_frames * c.audio_samples_per_frame
        audio_pos = {"num_bands": 5, "max_resolution": (n_audio,), "sine_only": False, "concat_pos": True}
        video_pos = {"num_bands": 2, "max_resolution": (c.num_frames, c.image_size, c.image_size),
                     "sine_only": False, "concat_pos": True}
        pre = ns.PerceiverMultimodalPreprocessor(
            min_padding_size=4, mask_probs=mask_probs,
            modalities={
                "audio": ns.PerceiverAudioPreprocessor(c, position_encoding_type="fourier", prep_type="patches",
                                                       fourier_position_encoding_kwargs=audio_pos,
                                                       samples_per_patch=c.samples_per_patch),
                "image": ns.PerceiverImagePreprocessor(c, position_encoding_type="fourier", prep_type="patches",
                                                       fourier_position_encoding_kwargs=video_pos,
                                                       spatial_downsample=4, temporal_downsample=1),
                "label": ns.PerceiverOneHotPreprocessor(c)})
        video = ns.PerceiverBasicVideoAutoencodingDecoder(
            c, concat_preprocessed_input=False, output_shape=c.output_shape, output_num_channels=c.output_num_channels,
            use_query_residual=False, position_encoding_only=True, position_encoding_type="fourier",
            fourier_position_encoding_kwargs=video_pos)
        decoder = ns.PerceiverMultimodalDecoder(
            c, concat_preprocessed_input=False, num_outputs=None, output_num_channels=c.output_num_channels,
            use_query_residual=False,
            modalities={
                "audio": ns.PerceiverBasicDecoder(
                    c, concat_preprocessed_input=False, output_index_dims=(n_audio // c.samples_per_patch,),
                    output_num_channels=c.output_num_channels, use_query_residual=False, position_encoding_only=True,
                    position_encoding_type="fourier", fourier_position_encoding_kwargs=audio_pos),
                "image": video,
                "label": ns.PerceiverClassificationDecoder(
                    c, concat_preprocessed_input=False, use_query_residual=False, position_encoding_only=True,
                    position_encoding_type="trainable",
                    trainable_position_encoding_kwargs={"num_channels": c._label_trainable_num_channels,
                                                        "index_dims": 1})})
        post = ns.PerceiverMultimodalPostprocessor(modalities={
            "audio": ns.PerceiverAudioPostprocessor(c, in_channels=c.output_num_channels),
            "image": ns.PerceiverProjectionPostprocessor(in_channels=c.output_num_channels, out_channels=3),
            "label": ns.PerceiverClassificationPostprocessor(c, in_channels=c.output_num_channels)})
        return {"input_preprocessor": pre, "decoder": decoder, "output_postprocessor": post}

    return make


def _mm_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(1, 2, 3, 8, 8, generator=g), "audio": torch.rand(1, 32, 1, generator=g) * 2 - 1,
            "label": torch.zeros(1, 5)}


@pytest.mark.parametrize("mask_probs", [{"image": 0.0, "audio": 0.0, "label": 1.0}, {"label": 1.0}],
                         ids=["all modalities", "label only"])
def test_multimodal_audio_video_label(mask_probs):
    points = {"image": torch.arange(30, 70), "audio": torch.tensor([0, 3]), "label": None}
    kw = {"inputs": _mm_inputs(), "subsampled_output_points": points}
    _, ours = _both_directions(f"multimodal (mask {sorted(mask_probs)})", MM_CONFIG, _multimodal(mask_probs), kw)
    logits = ours(**kw).logits
    assert logits["image"].shape == (1, 40, 3) and logits["audio"].shape == (1, 16) and logits["label"].shape == (1, 5)


def test_optical_flow_decoder():
    cfg_kw = dict(TRUNK, train_size=(6, 8), num_self_attention_heads=4)
    pos = {"num_bands": 3, "max_resolution": (6, 8), "sine_only": False, "concat_pos": True}

    def make(ns, c):
        pre = ns.PerceiverImagePreprocessor(c, prep_type="patches", spatial_downsample=1, conv_after_patching=True,
                                            conv_after_patching_in_channels=54, out_channels=8, temporal_downsample=2,
                                            position_encoding_type="fourier", fourier_position_encoding_kwargs=pos)
        dec = ns.PerceiverOpticalFlowDecoder(c, num_channels=pre.num_channels, output_image_shape=c.train_size,
                                             rescale_factor=100.0, use_query_residual=False, output_num_channels=2,
                                             position_encoding_type="fourier", fourier_position_encoding_kwargs=pos)
        return {"input_preprocessor": pre, "decoder": dec}

    g = torch.Generator().manual_seed(5)
    _, ours = _both_directions("optical flow", cfg_kw, make, {"inputs": torch.randn(2, 2, 27, 6, 8, generator=g)})
    assert ours(inputs=torch.randn(1, 2, 27, 6, 8)).logits.shape == (1, 6, 8, 2)


def _decoder_alone(name, make_decoder, reference, kw, config_kw):
    """Decoders transformers' PerceiverModel cannot call (their forward lacks output_attentions): transformers'
    reference is its decoder applied to its own latents."""
    pos = {"num_bands": 2, "max_resolution": (4, 5), "concat_pos": True, "sine_only": False}

    def make(ns, c):
        return {"input_preprocessor": ns.PerceiverImagePreprocessor(c, prep_type="pixels", spatial_downsample=1,
                                                                    fourier_position_encoding_kwargs=pos),
                "decoder": make_decoder(ns, c)}

    for direction in ("transformers → ours", "ours → transformers"):
        hf, ours = _pair(config_kw, make)
        if direction == "ours → transformers":
            randomize(ours, seed=7)
            hf.load_state_dict(ours.transformers_state_dict(), strict=True)
        decoder, hf.decoder = hf.decoder, None
        with torch.no_grad():
            z = hf(inputs=kw["inputs"]).last_hidden_state
            theirs = reference(decoder, z, kw)
            mine = ours(**kw).logits
        err = _diff(mine, theirs)
        assert err < ATOL, f"{name} ({direction}): {err:.3g}"
        ERRORS[name] = max(err, ERRORS.get(name, 0.0))
    return mine


class _Projection(tm.PerceiverProjectionDecoder):
    """transformers' projection decoder lacks its abstract ``num_query_channels`` (it cannot be built as is)."""

    num_query_channels = None


def test_projection_decoder():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(6))
    make = lambda ns, c: _Projection(c) if ns is tm else ns.PerceiverProjectionDecoder(c)
    logits = _decoder_alone("projection decoder", make,
                            lambda dec, z, kw: dec(None, z), {"inputs": x}, dict(TRUNK, num_labels=4))
    assert logits.shape == (2, 4)


def test_video_autoencoding_decoder_subsampled():
    video_pos = {"num_bands": 2, "max_resolution": (2, 3, 3), "sine_only": False, "concat_pos": True}
    points = torch.tensor([0, 5, 7, 17])

    def make_decoder(ns, c):
        return ns.PerceiverBasicVideoAutoencodingDecoder(
            c, output_shape=(1, 2, 3, 3), output_num_channels=4, position_encoding_type="fourier",
            num_channels=15, fourier_position_encoding_kwargs=video_pos)

    def reference(dec, z, kw):
        query = dec.decoder_query(z, subsampled_points=points)
        return dec.decoder(query, z).logits

    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(6))
    logits = _decoder_alone("video autoencoding decoder (subsampled)", make_decoder, reference,
                            {"inputs": x, "subsampled_output_points": points}, TRUNK)
    assert logits.shape == (2, 4, 4)


# ------------------------------------------------------------------------------------ API and numerics


def test_return_dict_false_is_transformers_tuple():
    def make(ns, c):
        return {"input_preprocessor": _one_hot(ns, c), "decoder": _classifier(ns, c)}

    hf, ours = _pair(dict(TRUNK, num_labels=5), make)
    x = torch.nn.functional.one_hot(torch.tensor([0, 2]), 5).float()
    for flags in ({}, {"output_attentions": True}, {"output_hidden_states": True, "output_attentions": True}):
        with torch.no_grad():
            theirs = hf(inputs=x, return_dict=False, **flags)
            mine = ours(inputs=x, return_dict=False, **flags)
        assert len(mine) == len(theirs)
        assert _diff(list(mine), list(theirs)) < ATOL
    out = ours(inputs=x)
    assert out[0] is out.logits and out["last_hidden_state"] is out.last_hidden_state


def test_default_numerics_are_deepmind():
    """The default computes tanh GELU (DeepMind): equal to transformers run with a tanh GELU, not with erf."""
    def make(ns, c):
        return {"input_preprocessor": _one_hot(ns, c), "decoder": _classifier(ns, c)}

    x = torch.eye(5)[:2]
    hf, ours = _pair(dict(TRUNK, num_labels=5, hidden_act="gelu_pytorch_tanh"), make, numerics="deepmind")
    _compare("default numerics (tanh GELU config)", hf, ours, {"inputs": x})
    hf, ours = _pair(dict(TRUNK, num_labels=5), make, numerics="deepmind")
    with torch.no_grad():
        assert _diff(ours(inputs=x).logits, hf(inputs=x).logits) > 1e-4


def test_config_matches_transformers():
    hf_config = transformers.PerceiverConfig(num_labels=3)
    theirs = hf_config.to_dict()
    mine = phf.PerceiverConfig(num_labels=3).to_dict()
    for key, value in mine.items():
        expected = theirs[key] if key in theirs else getattr(hf_config, key)
        assert (tuple(value) if isinstance(value, (list, tuple)) else value) == (
            tuple(expected) if isinstance(expected, (list, tuple)) else expected), key
    assert phf.PerceiverConfig.coerce(transformers.PerceiverConfig(d_latents=32, num_labels=4)).d_latents == 32
    assert phf.PerceiverConfig.coerce({"d_model": 8, "architectures": ["X"], "foo": 1}).extra == {"foo": 1}
    small = phf.PerceiverConfig(**dict(TRUNK, num_labels=5))
    model = phf.PerceiverForImageClassificationFourier(small)  # the head names take our config too
    assert model.config.num_labels == 5 and model.config.d_latents == 16


# ----------------------------------------------------------------------------------------------- errors


def test_errors_name_expected_and_got():
    c = phf.PerceiverConfig(**dict(TRUNK, num_labels=5))
    with pytest.raises(ValueError, match="prep_type must be"):
        phf.PerceiverImagePreprocessor(c, prep_type="conv3x3")
    with pytest.raises(ValueError, match="position_encoding_type must be"):
        phf.PerceiverImagePreprocessor(c, position_encoding_type="learned")
    with pytest.raises(ValueError, match="fourier_position_encoding_kwargs"):
        phf.PerceiverImagePreprocessor(c)
    with pytest.raises(ValueError, match="strides the batch"):
        phf.PerceiverImagePreprocessor(c, prep_type="pixels", fourier_position_encoding_kwargs=_FOURIER)
    with pytest.raises(ValueError, match="temporal_downsample must be an int >= 1, got 0"):
        phf.PerceiverImagePreprocessor(c, prep_type="patches", temporal_downsample=0, conv_after_patching=True,
                                       fourier_position_encoding_kwargs=_FOURIER)
    with pytest.raises(ValueError, match="num_channels=12 must equal the query width: the trainable queries have 16"):
        phf.PerceiverBasicDecoder(c, 5, num_channels=12,
                                  trainable_position_encoding_kwargs={"num_channels": 16, "index_dims": 1})
    other = phf.PerceiverConfig(**dict(TRUNK, d_latents=8))
    with pytest.raises(ValueError, match="attends 8-channel latents but config.d_latents is 16"):
        phf.PerceiverModel(c, decoder=_classifier(phf, other))
    pre = phf.PerceiverImagePreprocessor(c, prep_type="pixels", spatial_downsample=1,
                                         fourier_position_encoding_kwargs=_FOURIER)
    flow = phf.PerceiverOpticalFlowDecoder(c, num_channels=pre.num_channels + 1, output_image_shape=(4, 5),
                                           position_encoding_type="none")
    with pytest.raises(ValueError, match=f"num_channels={pre.num_channels + 1} but the preprocessor gives"):
        phf.PerceiverModel(c, decoder=flow, input_preprocessor=pre)
    with pytest.raises(ValueError, match="needs a decoder"):
        phf.PerceiverModel(c, output_postprocessor=phf.PerceiverProjectionPostprocessor(4, 3))
    with pytest.raises(ValueError, match="numerics must be"):
        phf.PerceiverModel(c, numerics="jax")
    with pytest.raises(TypeError, match="config must be"):
        phf.PerceiverModel(42)
    model = phf.PerceiverModel(phf.PerceiverConfig(**dict(TRUNK, d_model=12)))
    with pytest.raises(ValueError, match="inputs have 10 channels but config.d_model is 12"):
        model(inputs=torch.randn(1, 3, 10))
    with pytest.raises(ValueError, match="head_mask"):
        model(inputs=torch.randn(1, 3, 12), head_mask=torch.ones(2))


def test_state_dict_that_does_not_fit():
    model = phf.PerceiverModel(phf.PerceiverConfig(**dict(TRUNK, d_model=12)), numerics="transformers")
    state = model.transformers_state_dict()
    assert "embeddings.latents" in state and "encoder.self_attends.1.mlp.dense2.bias" in state
    with pytest.raises(CheckpointError, match="no rule .*decoder.final_layer.weight"):
        model.load_transformers_state_dict({**state, "decoder.final_layer.weight": torch.zeros(1)})
    missing = dict(state)
    del missing["encoder.cross_attention.attention.self.query.weight"]
    with pytest.raises(CheckpointError, match="missing 1: encoder.cross_attention.attn.to_q.weight"):
        model.load_transformers_state_dict(missing)
    with pytest.raises(CheckpointError, match="mis-shaped 1: encoder.latents.embeddings"):
        model.load_transformers_state_dict({**state, "embeddings.latents": torch.zeros(3, 16)})
    plain = phf.PerceiverModel(phf.PerceiverConfig(**TRUNK), decoder=__import__("perceivers").io.ProjectionDecoder(
        2, latent_channels=16))
    with pytest.raises(TypeError, match="ProjectionDecoder, which has no transformers counterpart"):
        plain.transformers_state_dict()


def test_zz_report_largest_differences():
    """Printed with ``-s``: the largest difference of each combination (all below ATOL, asserted above)."""
    for name, err in sorted(ERRORS.items()):
        print(f"{name:55s} {err:.2e}")
