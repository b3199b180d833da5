"""Parity with DeepMind's official Haiku code on the reference vectors in tests/data/haiku.

Each folder holds a checkpoint in the official format (small random weights, every bias and norm
perturbed), inputs, and the outputs of the official JAX forward pass. The checkpoint is loaded through
:func:`perceivers.convert.haiku.load_haiku_checkpoint` into the matching ``create_model`` variant,
with every size read from ``config.json``, and the outputs must match elementwise within
``atol = 3e-5 · max(1, max|ref|)`` in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from perceivers import create_model
from perceivers.convert.haiku import load_haiku_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data" / "haiku"


def _config(task: str) -> dict:
    return json.loads((DATA / task / "config.json").read_text())


def _io(task: str) -> dict[str, np.ndarray]:
    with np.load(DATA / task / "io.npz") as f:
        return {k: f[k] for k in f.files}


def _check(name: str, got: torch.Tensor, ref: np.ndarray) -> float:
    got = got.detach().numpy()
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    atol = 3e-5 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= atol, f"{name}: max |diff| {err:.3g} > atol {atol:.3g}"
    return err


def _nchw(images: np.ndarray) -> torch.Tensor:
    """Official NHWC / NTHWC arrays → our channels-first layout."""
    return torch.from_numpy(images).movedim(-1, -3).contiguous()


def _trunk(enc: dict) -> dict:
    return {
        "num_latents": enc["z_index_dim"], "d_latents": enc["num_z_channels"], "num_blocks": enc["num_blocks"],
        "num_self_attends_per_block": enc["num_self_attends_per_block"],
        "num_self_attention_heads": enc["num_self_attend_heads"], "num_cross_attention_heads": enc["num_cross_attend_heads"],
    }


def _imagenet_model(task: str, variant: str):
    mc = _config(task)["model_config"]
    pre, dec = mc["input_preprocessor"], mc["decoder"]
    kw = dict(_trunk(mc["encoder"]), num_labels=mc["num_classes"], image_size=mc["image_shape"][1:3],
              decoder_query_residual=dec["use_query_residual"])
    if pre["position_encoding_type"] == "fourier":
        ff = pre["fourier_position_encoding_kwargs"]
        kw.update(num_bands=ff["num_bands"], max_resolution=ff["max_resolution"])
    else:
        kw.update(preprocessor_channels=pre["num_channels"], project_pos_dim=pre["project_pos_dim"],
                  position_channels=pre["trainable_position_encoding_kwargs"]["num_channels"])
    model = create_model(variant, **kw).eval()
    return load_haiku_checkpoint(model, DATA / task / "params.pkl")


@pytest.mark.parametrize(
    "task,variant",
    [
        ("imagenet_fourier", "vision-perceiver-fourier"),
        ("imagenet_conv", "vision-perceiver-conv"),
        ("imagenet_learned", "vision-perceiver-learned"),
    ],
)
def test_imagenet(task: str, variant: str) -> None:
    model = _imagenet_model(task, variant)
    data = _io(task)
    runs = [("images", "logits"), ("images_alt", "logits_alt")]
    with torch.no_grad():
        for inp, out in runs:
            if inp in data:
                _check(f"{task}/{out}", model(_nchw(data[inp])).logits, data[out])


def _mlm_model():
    mc = _config("mlm")["model_config"]
    enc, dec = mc["encoder_config"], mc["decoder_config"]
    model = create_model(
        "language-perceiver", vocab_size=mc["vocab_size"], d_model=mc["D_MODEL"], max_position_embeddings=mc["MAX_SEQ_LEN"],
        num_latents=enc["z_index_dim"], d_latents=enc["num_z_channels"], num_blocks=enc["num_blocks"],
        num_self_attends_per_block=enc["num_self_attends_per_block"], num_self_attention_heads=enc["num_self_attend_heads"],
        num_cross_attention_heads=enc["num_cross_attend_heads"], qk_channels=enc["qk_channels"],
        v_channels=enc["v_channels"], num_decoder_heads=dec["num_heads"], decoder_qk_channels=dec["qk_channels"],
        decoder_v_channels=dec["v_channels"], decoder_query_residual=dec["use_query_residual"],
    ).eval()
    return load_haiku_checkpoint(model, DATA / "mlm" / "params.pkl")


def test_masked_language_model() -> None:
    model = _mlm_model()
    data = _io("mlm")
    ids, mask = torch.from_numpy(data["inputs"]), torch.from_numpy(data["input_mask"])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        # The full array includes padded positions, where the official code zeroes the attention output.
        _check("mlm/logits", logits, data["logits"])
        # Negative control: without the decoder query mask the padded rows must come out different.
        unmasked = model.perceiver(ids, input_mask=mask, query_kwargs={"length": ids.shape[1]}).logits
        unmasked = model.embedding_decoder(unmasked, model.perceiver.input_preprocessor.embeddings.weight)
        assert float((unmasked - torch.from_numpy(data["logits"])).abs().max()) > 1.0
        # Dropping the padding of row 0 (61 real bytes) must give the same logits for its real bytes.
        n = int(mask[0].sum())
        short = model(ids[:1, :n], attention_mask=mask[:1, :n]).logits
        _check("mlm/logits[0, :n] (unpadded)", short[0], data["logits"][0, :n])


def _flow_model():
    s = _config("optical_flow")["model_config"]["sizes"]
    model = create_model(
        "optical-flow-perceiver", train_size=s["TRAIN_SIZE"], num_bands=s["num_bands"], num_latents=s["z_index_dim"],
        d_latents=s["num_z_channels"], num_self_attends_per_block=s["num_self_attends_per_block"],
        num_self_attention_heads=s["num_self_attend_heads"], flow_scale_factor=s["FLOW_SCALE_FACTOR"],
    ).eval()
    return load_haiku_checkpoint(model, DATA / "optical_flow" / "params.pkl")


def test_optical_flow_patches_and_frames() -> None:
    model = _flow_model()
    data = _io("optical_flow")
    with torch.no_grad():
        from_patches = model(_nchw(data["model_input_patches"]))
        from_frames = model(_nchw(data["images"]))
    _check("optical_flow/flow (27-channel patches)", from_patches.flow, data["flow"])
    _check("optical_flow/flow (raw frame pairs)", from_frames.flow, data["flow"])
    _check("optical_flow/logits = flow / 20", from_patches.logits, data["flow"] / 20)


def test_patches_for_flow_matches_official() -> None:
    from perceivers.io.processors import patches_for_flow

    data = _io("optical_flow")
    got = patches_for_flow(_nchw(data["images"])).movedim(-3, -1)
    np.testing.assert_array_equal(got.numpy(), data["model_input_patches"])


def _multimodal_model():
    s = _config("multimodal_autoencoding")["model_config"]["sizes"]
    model = create_model(
        "multimodal-perceiver", num_frames=s["NUM_FRAMES"], image_size=s["INPUT_IMG_SZ"],
        audio_samples_per_frame=s["AUDIO_SAMPLES_PER_FRAME"], samples_per_patch=s["SAMPLES_PER_PATCH"],
        num_labels=s["NUM_CLASSES"], image_num_bands=s["image_num_bands"], audio_num_bands=s["audio_num_bands"],
        num_latents=s["z_index_dim"], d_latents=s["num_z_channels"],
        num_self_attends_per_block=s["num_self_attends_per_block"], num_self_attention_heads=s["num_self_attend_heads"],
        label_query_channels=s["label_query_channels"], output_num_channels=s["output_num_channels"],
    ).eval()
    return load_haiku_checkpoint(model, DATA / "multimodal_autoencoding" / "params.pkl")


def test_multimodal_full_and_chunk() -> None:
    model = _multimodal_model()
    data = _io("multimodal_autoencoding")
    inputs = {"image": _nchw(data["images"]), "audio": torch.from_numpy(data["audio"]),
              "label": torch.from_numpy(data["label_input"])}
    with torch.no_grad():
        for run in ("full", "chunk"):
            points = {m: torch.from_numpy(data[f"subsampling_{run}_{m}"]) for m in ("image", "audio")}
            out = model(inputs, subsampled_output_points=points).logits
            for m in ("image", "audio", "label"):
                _check(f"multimodal/{run}_{m}", out[m], data[f"{run}_{m}"])
        # No subsampling = every point, with the same (chunked-decoding) query positions.
        default = model(inputs).logits
        for m in ("image", "audio", "label"):
            _check(f"multimodal/default_{m}", default[m], data[f"full_{m}"])
