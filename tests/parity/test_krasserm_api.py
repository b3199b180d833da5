"""Parity of ``perceivers.krasserm`` with krasserm's perceiver-io 0.11.0 backend.

``_krasserm_api_reference.py`` (a subprocess: the reference needs its own path set-up) builds tiny
seeded models with every parameter randomised; here each state dict loads strictly into our model of
the same constructor arguments, and the outputs (and, for the MLM, the gradients) match to 1e-5 (times
the output's magnitude where it exceeds 1: the encoder's latents reach ~20).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceivers import krasserm as kr

REF = Path(sys.prefix) / "refs" / "perceiver-io-0.11.0" / "perceiver"
SCRIPT = Path(__file__).with_name("_krasserm_api_reference.py")
TOL = 1e-5
pytestmark = pytest.mark.skipif(not REF.is_dir(), reason=f"{REF.parent} missing (make setup installs it)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("krasserm_api")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "DONE" in proc.stdout, proc.stderr[-3000:]
    return out


def _load(reference: Path, name: str) -> dict:
    return torch.load(reference / f"{name}.pt", weights_only=False)


def _strict(model: torch.nn.Module, ref: dict) -> torch.nn.Module:
    assert set(model.state_dict()) == set(ref["state_dict"])
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval()


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < TOL * max(1.0, theirs.abs().max().item()), diff  # float32 rounding grows with the scale
    return diff


def _config(d: dict, encoder_cls, decoder_cls) -> kr.PerceiverIOConfig:
    return kr.PerceiverIOConfig(**{**d, "encoder": encoder_cls(**d["encoder"]), "decoder": decoder_cls(**d["decoder"])})


def _perceiver_io(kw: dict) -> kr.PerceiverIO:
    adapter = kr.TokenInputAdapter(vocab_size=30, max_seq_len=10, num_input_channels=10)
    decoder = kr.PerceiverDecoder(
        kr.ClassificationOutputAdapter(num_classes=7, num_output_query_channels=6),
        kr.TrainableQueryProvider(num_queries=3, num_query_channels=6), num_latent_channels=kw["num_latent_channels"],
        num_cross_attention_heads=2, num_cross_attention_qk_channels=8, cross_attention_widening_factor=2,
    )
    return kr.PerceiverIO(kr.PerceiverEncoder(adapter, **kw), decoder)


@pytest.mark.parametrize("name", ["enc_unshared", "enc_shared"])
def test_encoder_decoder(reference, name):
    ref = _load(reference, name)
    model = _strict(_perceiver_io(ref["kwargs"]), ref)
    x, pad, out = ref["inputs"]["x"], ref["inputs"]["pad_mask"], ref["outputs"]
    with torch.no_grad():
        latents, adapted = model.encoder(x, pad_mask=pad, return_adapted_input=True)
        _close(adapted, out["adapted"])
        _close(latents, out["latents"])
        _close(model.decoder(latents), out["logits"])
        _close(model.encoder(x), out["latents_nopad"])
    shared = ref["kwargs"]["first_cross_attention_layer_shared"]
    assert hasattr(model.encoder, "cross_attn_n") is not shared


def test_masked_language_model_and_gradients(reference):
    ref = _load(reference, "mlm")
    model = _strict(kr.MaskedLanguageModel(_config(ref["kwargs"], kr.TextEncoderConfig, kr.TextDecoderConfig)), ref)
    assert isinstance(model.decoder.output_adapter, kr.TiedTokenOutputAdapter)
    x, pad = ref["inputs"]["x"], ref["inputs"]["pad_mask"]
    with torch.no_grad():
        _close(model(x, pad_mask=pad), ref["outputs"]["logits"])
    model(x, pad_mask=pad).square().mean().backward()
    grads = dict(model.named_parameters())
    assert set(grads) == set(ref["grads"])
    for key, theirs in ref["grads"].items():
        _close(grads[key].grad, theirs)


def test_text_classifier(reference):
    ref = _load(reference, "text_classifier")
    config = _config(ref["kwargs"], kr.TextEncoderConfig, kr.ClassificationDecoderConfig)
    model = _strict(kr.TextClassifier(config), ref)
    with torch.no_grad():
        _close(model(ref["inputs"]["x"], pad_mask=ref["inputs"]["pad_mask"]), ref["outputs"]["logits"])


def test_image_classifier(reference):
    ref = _load(reference, "image_classifier")
    config = _config(ref["kwargs"], kr.ImageEncoderConfig, kr.ClassificationDecoderConfig)
    model = kr.ImageClassifier(config)
    key = "0.input_adapter.position_encoding.position_encoding"
    _close(model.state_dict()[key], ref["state_dict"][key])  # our Fourier features, before loading theirs
    model = _strict(model, ref)
    with torch.no_grad():
        _close(model(ref["inputs"]["x"]), ref["outputs"]["logits"])
    with pytest.raises(ValueError, match="different from required shape"):
        model(torch.zeros(1, 5, 6, 3))


def test_perceiver_io_060_keys_load(reference):
    """perceiver-io 0.6 named the latents, output query and text positions differently: renamed on load."""
    ref = _load(reference, "mlm")
    old = {"0.latent_provider._query": "0.latent", "1.output_query_provider._query": "1.output_adapter._output_query",
           "0.input_adapter.pos_embedding.weight": "0.input_adapter.pos_encoding"}
    state = {old.get(k, k): v for k, v in ref["state_dict"].items()}
    model = kr.MaskedLanguageModel(_config(ref["kwargs"], kr.TextEncoderConfig, kr.TextDecoderConfig))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        _close(model.eval()(ref["inputs"]["x"], pad_mask=ref["inputs"]["pad_mask"]), ref["outputs"]["logits"])


def test_activation_checkpointing_same_numbers_and_keys(reference):
    """krasserm wraps layers with fairscale; here ``torch.utils.checkpoint``: same keys, same forward and grads."""
    ref = _load(reference, "enc_unshared")
    plain = _strict(_perceiver_io(ref["kwargs"]), ref).encoder
    ckpt = _strict(_perceiver_io({**ref["kwargs"], "activation_checkpointing": True}), ref).encoder
    x, pad = ref["inputs"]["x"], ref["inputs"]["pad_mask"]
    out_plain, out_ckpt = plain(x, pad_mask=pad), ckpt(x, pad_mask=pad)
    _close(out_ckpt, out_plain)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    q = "latent_provider._query"
    _close(ckpt.get_parameter(q).grad, plain.get_parameter(q).grad)
