"""JOBR0/PerceiverIO_Pytorch ``.pth`` checkpoints: recognised by ``load_checkpoint``, renamed strictly, and
giving JOBR0's own outputs.

``tests/data/jobr0`` holds, for each of the six official models, a tiny random-weight checkpoint written by
JOBR0's code in its distribution format (``{"model_state_dict": ...}``) and the outputs JOBR0's forward pass
gives on fixed inputs (how they were made: README.md there). JOBR0 computes exact erf GELU where DeepMind
uses the tanh approximation, so its outputs are reproduced by our models built with ``hidden_act="gelu"``;
the default (DeepMind's tanh GELU) must differ by far more than the tolerance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from perceivers import create_model, load_checkpoint
from perceivers.commands import convert
from perceivers.convert.jobr0 import convert_jobr0_state_dict, is_jobr0_state_dict
from perceivers.convert.state_dict import CheckpointError
from perceivers.hub import from_pretrained

DATA = Path(__file__).resolve().parents[1] / "data" / "jobr0"

_TRUNK = {"num_latents": 8, "d_latents": 32, "num_self_attends_per_block": 2}
_IMAGENET = {**_TRUNK, "num_labels": 7, "num_blocks": 2, "decoder_query_channels": 32}
# Our create_model overrides matching the sizes each checkpoint was written with (config.json there).
MODELS = {
    "imagenet_fourier_position_encoding": ("vision-perceiver-fourier", {
        **_IMAGENET, "image_size": (12, 10), "num_bands": 4, "max_resolution": (12, 10)}),
    "imagenet_conv_preprocessing": ("vision-perceiver-conv", {
        **_IMAGENET, "image_size": (16, 20), "num_bands": 4, "max_resolution": (4, 5)}),
    "imagenet_learned_position_encoding": ("vision-perceiver-learned", {
        **_IMAGENET, "image_size": (6, 5), "preprocessor_channels": 8, "position_channels": 6, "project_pos_dim": 10,
        "decoder_query_residual": False}),
    "language_perceiver_io_bytes": ("language-perceiver", {
        "num_latents": 6, "d_latents": 24, "num_self_attends_per_block": 2, "vocab_size": 262, "d_model": 16,
        "max_position_embeddings": 16, "qk_channels": 16, "v_channels": 24, "decoder_qk_channels": 16,
        "decoder_v_channels": 16}),
    "optical_flow_checkpoint": ("optical-flow-perceiver", {
        **_TRUNK, "train_size": (6, 8), "num_bands": 3, "num_self_attention_heads": 16}),
    "video_autoencoding_checkpoint": ("multimodal-perceiver", {
        **_TRUNK, "num_frames": 5, "image_size": (8, 8), "audio_samples_per_frame": 16, "samples_per_patch": 8,
        "num_labels": 5, "image_num_bands": 2, "audio_num_bands": 3, "label_query_channels": 32,
        "output_num_channels": 16}),
}


def _model(stem: str, hidden_act: str = "gelu"):
    variant, overrides = MODELS[stem]
    return create_model(variant, hidden_act=hidden_act, **overrides).eval()


def _io(stem: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{stem}.npz") as f:
        return {k: f[k] for k in f.files}


def _outputs(stem: str, model) -> dict[str, torch.Tensor]:
    """Our outputs on the stored inputs, in the layout JOBR0 returned them."""
    d = _io(stem)
    with torch.no_grad():
        if stem.startswith("imagenet"):
            return {"logits": model(torch.from_numpy(d["images"])).logits}
        if stem.startswith("language"):
            ids, mask = torch.from_numpy(d["inputs"]), torch.from_numpy(d["input_mask"])
            return {"logits": model(ids, attention_mask=mask).logits}
        if stem.startswith("optical_flow"):
            return {"flow": model(torch.from_numpy(d["frames"])).flow.permute(0, 3, 1, 2)}  # JOBR0: [B, 2, H, W]
        images, audio = torch.from_numpy(d["images"]), torch.from_numpy(d["audio"])
        inputs = {"image": images, "audio": audio, "label": torch.zeros(images.shape[0], d["full_label"].shape[-1])}
        out = {}
        for run in ("full", "chunk"):
            points = {m: torch.from_numpy(d[f"subsampling_{run}_{m}"]) for m in ("image", "audio")}
            logits = model(inputs, subsampled_output_points=points).logits
            out.update({f"{run}_{m}": logits[m] for m in ("image", "audio", "label")})
        return out


def _max_errors(stem: str, model) -> dict[str, tuple[float, float]]:
    """``{output: (max |ours − JOBR0|, atol)}`` with ``atol = 1e-5 · max(1, max |JOBR0|)``."""
    ref = _io(stem)
    errors = {}
    for name, got in _outputs(stem, model).items():
        want = ref[name]
        assert tuple(got.shape) == want.shape, f"{stem}/{name}: shape {tuple(got.shape)} != {want.shape}"
        errors[name] = (float(np.abs(got.numpy() - want).max()), 1e-5 * max(1.0, float(np.abs(want).max())))
    return errors


@pytest.mark.parametrize("stem", sorted(MODELS))
def test_jobr0_checkpoint_reproduces_jobr0(stem: str) -> None:
    model = load_checkpoint(_model(stem), DATA / f"{stem}.pth")
    for name, (err, atol) in _max_errors(stem, model).items():
        assert err <= atol, f"{stem}/{name}: max |diff| {err:.3g} > atol {atol:.3g}"


@pytest.mark.parametrize("stem", ["imagenet_conv_preprocessing", "video_autoencoding_checkpoint"])
def test_default_numerics_are_deepminds_not_jobr0s(stem: str) -> None:
    """With DeepMind's tanh GELU (our default) the same weights give visibly different outputs."""
    model = load_checkpoint(_model(stem, hidden_act="gelu_tanh"), DATA / f"{stem}.pth")
    assert all(err > 10 * atol for err, atol in _max_errors(stem, model).values())


def test_recognition_and_every_tensor_used() -> None:
    for stem in MODELS:
        state = torch.load(DATA / f"{stem}.pth", weights_only=True)["model_state_dict"]
        assert is_jobr0_state_dict(state), stem
        converted = convert_jobr0_state_dict(state, _model(stem))
        assert set(converted) == set(_model(stem).state_dict()), stem
    own = create_model("vision-perceiver-conv", tiny=True).state_dict()
    assert not is_jobr0_state_dict(own)


def _state(stem: str) -> dict[str, torch.Tensor]:
    return dict(torch.load(DATA / f"{stem}.pth", weights_only=True)["model_state_dict"])


def _save(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "edited.pth"
    torch.save({"model_state_dict": state}, path)
    return path


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path: Path) -> None:
    stem = "imagenet_conv_preprocessing"
    norm = "perceiver._multi_preprocessor._preprocessors.default.convnet.norms.0.running_var"
    proj = "perceiver._encoder.self_attends.1.attention.proj_v.weight"

    state = _state(stem)
    del state[norm]
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\): " + re.escape(norm)):
        load_checkpoint(_model(stem), _save(tmp_path, state))

    state = _state(stem)
    state["perceiver._encoder.self_attends.2.layer_norm1.weight"] = torch.ones(32)
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(1\): .*self_attends\.2\.layer_norm1"):
        load_checkpoint(_model(stem), _save(tmp_path, state))

    state = _state(stem)
    state[proj] = state[proj][:, :16]
    with pytest.raises(CheckpointError, match=re.escape(f"{proj} (32, 16) → perceiver.encoder.self_attends.1")):
        load_checkpoint(_model(stem), _save(tmp_path, state))

    # A model built at other sizes is refused with the keys that differ, not loaded partially.
    smaller = create_model(MODELS[stem][0], **dict(MODELS[stem][1], num_self_attends_per_block=1))
    with pytest.raises(CheckpointError, match=r"unexpected in the checkpoint \(\d+\): .*self_attends\.1\."):
        load_checkpoint(smaller, DATA / f"{stem}.pth")


def test_untied_language_embedding_copy_is_refused(tmp_path: Path) -> None:
    stem = "language_perceiver_io_bytes"
    state = _state(stem)
    key = "perceiver._output_postprocessors.default._embedding.weight"
    state[key] = state[key].clone() + 1
    with pytest.raises(CheckpointError, match="tied"):
        load_checkpoint(_model(stem), _save(tmp_path, state))


def test_later_default_modality_name(tmp_path: Path) -> None:
    """Later JOBR0 versions key a lone modality as ``__default``; both spellings load."""
    stem = "imagenet_learned_position_encoding"
    state = {k.replace(".default.", ".__default."): v for k, v in _state(stem).items()}
    model = load_checkpoint(_model(stem), _save(tmp_path, state))
    for name, (err, atol) in _max_errors(stem, model).items():
        assert err <= atol, name


def test_convert_command(tmp_path: Path, capsys) -> None:
    stem = "optical_flow_checkpoint"
    variant, overrides = MODELS[stem]
    config = json.dumps({**overrides, "hidden_act": "gelu"})
    dst = tmp_path / "out"
    assert convert.main([str(DATA / f"{stem}.pth"), str(dst), "--model", variant, "--config", config]) == 0, \
        capsys.readouterr().err
    for name, (err, atol) in _max_errors(stem, from_pretrained(dst)).items():
        assert err <= atol, name

