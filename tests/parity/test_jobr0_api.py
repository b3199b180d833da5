"""perceivers.jobr0: JOBR0/PerceiverIO_Pytorch's task classes and calls, loading JOBR0's ``.pth`` files the
JOBR0 way and giving the outputs JOBR0's own code recorded (tests/data/jobr0, how they were made: README.md
there; the sizes JOBR0 hard-codes are passed as our config fields)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange

from perceivers import create_model
from perceivers.convert.state_dict import CheckpointError
from perceivers.data.flow import flow_model_fn, tile_flow
from perceivers.jobr0 import (
    ClassificationPerceiver,
    FlowPerceiver,
    LanguagePerceiver,
    MultiModalPerceiver,
    PrepType,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "jobr0"
CONFIG = json.loads((DATA / "config.json").read_text())

_TRUNK = {"num_latents": 8, "d_latents": 32, "num_self_attends_per_block": 2}
_IMAGENET = {**_TRUNK, "num_blocks": 2, "decoder_query_channels": 32}
# Our config fields for the sizes the fixture made keyword arguments (JOBR0 hard-codes them).
_SIZES = {
    "imagenet_fourier_position_encoding": {**_IMAGENET, "num_bands": 4, "max_resolution": (12, 10)},
    "imagenet_conv_preprocessing": {**_IMAGENET, "num_bands": 4, "max_resolution": (4, 5)},
    "imagenet_learned_position_encoding": {**_IMAGENET, "preprocessor_channels": 8, "position_channels": 6,
                                           "project_pos_dim": 10},
    "language_perceiver_io_bytes": {"num_latents": 6, "num_self_attends_per_block": 2, "qk_channels": 16},
    "optical_flow_checkpoint": {"num_bands": 3, "num_self_attention_heads": 16},
    "video_autoencoding_checkpoint": {"num_latents": 8, "num_self_attends_per_block": 2, "image_num_bands": 2,
                                      "audio_num_bands": 3, "label_query_channels": 32, "output_num_channels": 16},
}


def _build(stem: str, **extra):
    """The JOBR0-API class with JOBR0's own constructor arguments (config.json) and the sizes above."""
    kw = CONFIG[stem]["kwargs"]
    sizes = {**_SIZES[stem], **extra}
    if stem.startswith("imagenet"):
        return ClassificationPerceiver(num_classes=kw["num_classes"], img_size=kw["img_size"],
                                       prep_type=PrepType[kw["prep_type"]], **sizes)
    if stem.startswith("language"):
        return LanguagePerceiver(vocab_size=kw["vocab_size"], max_seq_len=kw["max_seq_len"],
                                 latent_channels=kw["latent_channels"], embed_dim=kw["embed_dim"], **sizes)
    if stem.startswith("optical"):
        return FlowPerceiver(img_size=kw["img_size"], flow_scale_factor=kw["flow_scale_factor"],
                             n_latents=kw["n_latents"], num_latent_channels=kw["num_latent_channels"],
                             n_self_attends=kw["n_self_attends"], **sizes)
    return MultiModalPerceiver(img_size=kw["img_size"], num_frames=kw["num_frames"], num_classes=kw["num_classes"],
                               audio_samples_per_frame=kw["audio_samples_per_frame"],
                               audio_samples_per_patch=kw["audio_samples_per_patch"],
                               num_latent_channels=kw["num_latent_channels"], **sizes)


def _loaded(stem: str, **extra):
    """Built and loaded as JOBR0's examples do: ``load_state_dict(torch.load(path)["model_state_dict"])``."""
    model = _build(stem, **extra)
    model.load_state_dict(torch.load(DATA / f"{stem}.pth")["model_state_dict"])
    return model.eval()


def _io(stem: str) -> dict[str, torch.Tensor]:
    with np.load(DATA / f"{stem}.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """``max |got − want|`` within ``1e-5 · max(1, max |want|)`` (as tests/convert/test_jobr0.py)."""
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, atol = (got - want).abs().max().item(), 1e-5 * max(1.0, want.abs().max().item())
    assert err <= atol, f"{what}: max |diff| {err:.3g} > atol {atol:.3g}"
    return err


def _points(image: torch.Tensor) -> torch.Tensor:
    """``[B, T, C, H, W]`` → JOBR0's decoder points ``[B, T·H·W, C]``."""
    return rearrange(image, "b t c h w -> b (t h w) c")


# ------------------------------------------------------------------------------------ JOBR0's outputs


@pytest.mark.parametrize("stem", sorted(s for s in CONFIG if s.startswith("imagenet")))
def test_classification_perceiver(stem: str) -> None:
    d = _io(stem)
    with torch.no_grad():
        logits = _loaded(stem)(d["images"])  # [B, 3, H, W] → [B, num_classes]
    _close(logits, d["logits"], stem)


def test_language_perceiver() -> None:
    stem = "language_perceiver_io_bytes"
    d = _io(stem)
    assert not d["input_mask"].all()  # padding present: the query mask matters
    with torch.no_grad():
        logits = _loaded(stem)(d["inputs"], d["input_mask"])
    _close(logits, d["logits"], stem)


def test_flow_perceiver_at_training_size() -> None:
    stem = "optical_flow_checkpoint"
    d = _io(stem)
    with torch.no_grad():
        flow = _loaded(stem)(d["frames"][:, 0], d["frames"][:, 1])  # [N, 2, H, W], × flow_scale_factor
    _close(flow, d["flow"], stem)


def test_multimodal_perceiver_chunked_matches_jobr0() -> None:
    """The fixture holds one step of JOBR0's loop for the full output and for chunk 2 of 5."""
    stem = "video_autoencoding_checkpoint"
    d = _io(stem)
    model = _loaded(stem)
    t, h, w = d["images"].shape[1], *d["images"].shape[-2:]
    with torch.no_grad():
        full = model(d["images"], d["audio"], n_chunks=1)
        five = model(d["images"], d["audio"], n_chunks=5)
    assert full["image"].shape == d["images"].shape and full["audio"].shape == d["audio"].shape
    _close(_points(full["image"]), d["full_image"], "full image")
    _close(full["audio"][..., 0], d["full_audio"], "full audio")
    _close(full["label"], d["full_label"], "full label")
    image_points, audio_points = d["subsampling_chunk_image"], d["subsampling_chunk_audio"]
    _close(_points(five["image"])[:, image_points], d["chunk_image"], "chunk image")
    patch = CONFIG[stem]["kwargs"]["audio_samples_per_patch"]
    samples = (audio_points[:, None] * patch + torch.arange(patch)).flatten()
    _close(five["audio"][:, samples, 0], d["chunk_audio"], "chunk audio")
    _close(five["label"], d["chunk_label"], "chunk label")
    assert t * h * w == d["full_image"].shape[1]


# ----------------------------------------------------------------------- behaviour beyond the fixtures


def test_flow_test_mode_tiles_like_tile_flow() -> None:
    model = _loaded("optical_flow_checkpoint")
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 2, 12, 15, 3, generator=gen) * 255  # larger than 6×8: rows 0, 3, 6, 6; columns 0, 5, 7
    frames = rearrange(pixels / 255 * 2 - 1, "n t h w c -> n t c h w")
    with torch.no_grad():
        got = model(frames[:, 0], frames[:, 1], test_mode=True, min_overlap=3)
    want = tile_flow(flow_model_fn(model.model), pixels[:, 0], pixels[:, 1], tile_size=(6, 8), min_overlap=3)
    assert got.shape == (2, 2, 12, 15)
    torch.testing.assert_close(got, rearrange(want, "n h w c -> n c h w"), atol=1e-6, rtol=0)
    # At the training size, test mode is one tile: the plain forward pass.
    d = _io("optical_flow_checkpoint")
    with torch.no_grad():
        tiled = model(d["frames"][:, 0], d["frames"][:, 1], test_mode=True, min_overlap=3)
    _close(tiled, d["flow"], "test_mode at training size")


def test_multimodal_chunks_equal_full_decoding() -> None:
    model = _loaded("video_autoencoding_checkpoint")
    d = _io("video_autoencoding_checkpoint")
    with torch.no_grad():
        outs = [model(d["images"], d["audio"][..., 0], n_chunks=n) for n in (1, 2, 10)]
    for out in outs[1:]:
        assert out["audio"].shape == d["audio"].shape[:2]  # audio comes back in the layout it was given
        for key in ("image", "audio", "label"):
            torch.testing.assert_close(out[key], outs[0][key], atol=1e-5, rtol=0)  # float rounding


def test_default_numerics_are_jobr0s_and_tanh_is_available() -> None:
    stem = "imagenet_conv_preprocessing"
    d = _io(stem)
    with torch.no_grad():
        tanh = _loaded(stem, hidden_act="gelu_tanh")(d["images"])
    assert (tanh - d["logits"]).abs().max() > 1e-4  # DeepMind's GELU: visibly not JOBR0's outputs
    assert _loaded(stem).model.config.hidden_act == "gelu"


def test_our_own_state_dicts_load() -> None:
    stem = "language_perceiver_io_bytes"
    d = _io(stem)
    source = _loaded(stem)
    for state in (source.state_dict(), source.model.state_dict()):  # the wrapper's, and the task model's
        target = _build(stem).eval()
        target.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(target(d["inputs"], d["input_mask"]), source(d["inputs"], d["input_mask"]))


# -------------------------------------------------------------------------------------------- errors


def test_checkpoint_that_does_not_fit_is_named() -> None:
    state = torch.load(DATA / "imagenet_conv_preprocessing.pth")["model_state_dict"]
    smaller = _build("imagenet_conv_preprocessing", num_self_attends_per_block=1)
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(\d+\): .*self_attends\.1\."):
        smaller.load_state_dict(state)
    with pytest.raises(CheckpointError, match="does not fit"):
        _build("imagenet_fourier_position_encoding").load_state_dict(state)  # another model's checkpoint
    with pytest.raises(ValueError, match=re.escape("pass its state dict")):
        smaller.load_state_dict({"model_state_dict": state})
    with pytest.raises(ValueError, match="strict=False"):
        smaller.load_state_dict(state, strict=False)


def test_bad_inputs_name_expected_and_got() -> None:
    cls = _build("imagenet_fourier_position_encoding")
    with pytest.raises(ValueError, match=re.escape(r"img must be [batch, 3, 12, 10]") + ".*got \\(2, 12, 10, 3\\)"):
        cls(torch.zeros(2, 12, 10, 3))
    with pytest.raises(TypeError, match="floating-point"):
        cls(torch.zeros(2, 3, 12, 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="prep_type must be one of"):
        ClassificationPerceiver(prep_type="conv")

    lm = _build("language_perceiver_io_bytes")
    ids = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_masks must have the shape of inputs \(2, 16\), got \(2, 15\)"):
        lm(ids, torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most max_seq_len=16 tokens, got 17"):
        lm(torch.zeros(2, 17, dtype=torch.long), torch.ones(2, 17, dtype=torch.bool))

    flow = _build("optical_flow_checkpoint")
    small, big = torch.zeros(1, 3, 5, 8), torch.zeros(1, 3, 9, 12)
    with pytest.raises(ValueError, match=r"at least img_size \(6, 8\), got \(5, 8\)"):
        flow(small, small, test_mode=True)
    with pytest.raises(ValueError, match=r"must be img_size \(6, 8\) unless test_mode=True, got \(9, 12\)"):
        flow(big, big)
    with pytest.raises(ValueError, match=r"min_overlap=20 must be in \[0, 6\): at least 0 and smaller than the tile size"):
        flow(big, big, test_mode=True)
    with pytest.raises(ValueError, match="same shape"):
        flow(big, torch.zeros(1, 3, 9, 13), test_mode=True)

    mm = _build("video_autoencoding_checkpoint")
    d = _io("video_autoencoding_checkpoint")
    with pytest.raises(ValueError, match=r"images must be \[batch, 5, 3, 8, 8\].*got \(2, 5, 8, 8, 3\)"):
        mm(d["images"].movedim(2, -1), d["audio"])
    with pytest.raises(ValueError, match=r"audio must be \[batch, 80, 1\] or \[batch, 80\], got \(2, 79, 1\)"):
        mm(d["images"], d["audio"][:, :79])
    with pytest.raises(ValueError, match="3 chunks do not divide the 10 audio outputs"):
        mm(d["images"], d["audio"], n_chunks=3)
    with pytest.raises(TypeError, match="n_chunks must be an int"):
        mm(d["images"], d["audio"], n_chunks=2.0)


def test_wrapper_holds_our_task_model() -> None:
    """Thin: the JOBR0 class holds the registered variant, built at JOBR0's sizes."""
    model = _build("imagenet_conv_preprocessing")
    reference = create_model("vision-perceiver-conv", hidden_act="gelu", num_labels=7, image_size=(16, 20),
                             **_SIZES["imagenet_conv_preprocessing"])
    assert type(model.model) is type(reference)
    assert model.model.config == reference.config


def test_load_haiku_params_reads_deepminds_pickle() -> None:
    """JOBR0's ``load_haiku_params``: the official Haiku layout (tests/data/haiku, tiny sizes), DeepMind's GELU."""
    haiku = DATA.parent / "haiku" / "optical_flow"
    model = FlowPerceiver(img_size=(10, 18), n_latents=24, num_latent_channels=96, n_self_attends=3, num_bands=6,
                          num_self_attention_heads=16, hidden_act="gelu_tanh").eval()
    model.load_haiku_params(haiku / "params.pkl")
    with np.load(haiku / "io.npz") as f:
        frames, want = torch.from_numpy(f["images"]), torch.from_numpy(f["flow"])
    frames = rearrange(frames, "n t h w c -> n t c h w")
    with torch.no_grad():
        flow = model(frames[:, 0], frames[:, 1])
    _close(flow, rearrange(want, "n h w c -> n c h w"), "haiku flow")
