"""Parity with transformers' ``PerceiverForSequenceClassification`` and the masked-LM → classifier start.

A tiny random transformers classifier is saved, loaded with ``from_transformers`` (transformers
numerics) and compared; the masked-LM trunk transfer is checked against transformers' own
``PerceiverForSequenceClassification.from_pretrained(<masked LM checkpoint>)``.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from perceivers import from_pretrained, save_pretrained
from perceivers.convert.transformers import (
    convert_transformers_state_dict,
    from_transformers,
    save_transformers,
)
from perceivers.layers.attention import Attention
from perceivers.tasks import SequenceClassifier, create_model, from_language_model

ATOL = 1e-5
ARCH = "PerceiverForSequenceClassification"
TINY = {"num_latents": 6, "d_latents": 24, "num_blocks": 2, "num_self_attends_per_block": 2,
        "num_self_attention_heads": 2, "num_cross_attention_heads": 2, "qk_channels": 8, "v_channels": 24,
        "d_model": 16, "max_position_embeddings": 16, "attention_probs_dropout_prob": 0.0}
ERRORS: dict[str, float] = {}


def _randomized(model, seed: int = 0, prefix: str = ""):
    """Every tensor (under ``prefix``) random: norms near 1, biases small, weights fan-in scaled."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(prefix):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif p.ndim == 2 and "embeddings" not in name and "latents" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    for cls, extra in ((ARCH, {"num_labels": 3}), ("PerceiverForMaskedLM", {})):
        model = _randomized(getattr(transformers, cls)(transformers.PerceiverConfig(**TINY, **extra)))
        dirs[cls] = (model, tmp_path_factory.mktemp(cls))
        model.save_pretrained(dirs[cls][1])
    return dirs


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 262, (3, 16), generator=g)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 4:] = 0
    return ids, mask


def _err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def test_transformers_numerics_match(hf_dirs):
    hf, directory = hf_dirs[ARCH]
    ours = from_transformers(directory, numerics="transformers")
    assert isinstance(ours, SequenceClassifier) and ours.model_name == "language-perceiver-classifier"
    assert ours.config.num_labels == 3 and ours.config.hidden_act == "gelu"
    ids, mask = _batch()
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        want = hf(inputs=ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (3, 3)
    ERRORS["logits"] = _err(got.logits, want.logits)
    ERRORS["loss"] = _err(got.loss, want.loss)
    assert ERRORS["logits"] < ATOL and ERRORS["loss"] < ATOL, ERRORS


def test_loss_kinds_match_transformers(hf_dirs):
    hf, directory = hf_dirs[ARCH]
    ours = from_transformers(directory, numerics="transformers")
    ids, mask = _batch()
    g = torch.Generator().manual_seed(2)
    for kind, labels in (("multi_label_classification", (torch.rand(3, 3, generator=g) > 0.5).float()),
                         ("regression", torch.randn(3, 3, generator=g))):
        hf.config.problem_type = kind
        ours.config.problem_type = kind
        try:
            with torch.no_grad():
                want = hf(inputs=ids, attention_mask=mask, labels=labels).loss
                got = ours(ids, attention_mask=mask, labels=labels).loss
        finally:
            hf.config.problem_type = None
        assert _err(got, want) < ATOL, kind


def test_deepmind_numerics_differ_only_by_gelu(hf_dirs):
    _, directory = hf_dirs[ARCH]
    official, compat = from_transformers(directory), from_transformers(directory, numerics="transformers")
    assert official.config.hidden_act == "gelu_tanh"
    ids, mask = _batch()
    with torch.no_grad():
        diff = _err(official(ids, mask).logits, compat(ids, mask).logits)
        assert 0 < diff < 0.05
        official.config.hidden_act = "gelu"
        from perceivers.layers import FeedForward

        for m in official.modules():
            if isinstance(m, FeedForward):
                m.activation = "gelu"
        assert _err(official(ids, mask).logits, compat(ids, mask).logits) == 0


def test_round_trip_to_transformers_format(hf_dirs, tmp_path):
    """With transformers' numerics the same model again (the DeepMind-numerics round trip writes its tanh GELU:
    tests/parity/test_transformers.py)."""
    hf, directory = hf_dirs[ARCH]
    save_transformers(from_transformers(directory, numerics="transformers"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [ARCH] and len(cfg["id2label"]) == 3 and cfg["hidden_act"] == hf.config.hidden_act
    again = transformers.PerceiverForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = _batch()
    with torch.no_grad():
        assert _err(again(inputs=ids, attention_mask=mask).logits, hf(inputs=ids, attention_mask=mask).logits) == 0


def test_export_refuses_what_transformers_cannot_express():
    model = create_model("language-perceiver-classifier", tiny=True, num_decoder_heads=2)
    with pytest.raises(ValueError, match="num_decoder_heads=1"):
        save_transformers(model, "unused")


def test_masked_lm_checkpoint_initialises_the_trunk_like_transformers(hf_dirs, caplog):
    """transformers' documented start (SeqCls.from_pretrained(<MLM>)) and ours give the same model once the
    (randomly initialised) classification decoder is shared."""
    hf_mlm, mlm_dir = hf_dirs["PerceiverForMaskedLM"]
    hf_cls = transformers.PerceiverForSequenceClassification.from_pretrained(mlm_dir, num_labels=4)
    _randomized(hf_cls, seed=5, prefix="perceiver.decoder.")  # its fresh decoder gives near-zero logits
    with caplog.at_level(logging.INFO, logger="perceivers.tasks.text_classification"):
        ours = from_language_model(mlm_dir, num_labels=4, load_options={"numerics": "transformers"}).eval()
    report = ours.trunk_transfer
    assert set(report.skipped) == {k for k in convert_transformers_state_dict(hf_mlm.state_dict(), "PerceiverForMaskedLM")
                                   if k.startswith(("perceiver.decoder.", "embedding_decoder."))}
    assert report.initialised and all(k.startswith("perceiver.decoder.") for k in report.initialised)
    assert "embedding_decoder.bias" in caplog.text and "perceiver.decoder.decoder.output.weight" in caplog.text
    hf_state = convert_transformers_state_dict(hf_cls.state_dict(), ARCH)
    ours_state = ours.state_dict()
    for key in report.loaded:  # the trunk transformers loaded equals ours
        assert torch.equal(ours_state[key], hf_state[key]), key
    ours.load_state_dict({k: hf_state[k] for k in report.initialised}, strict=False)
    ids, mask = _batch()
    with torch.no_grad():
        err = _err(ours(ids, attention_mask=mask).logits, hf_cls(inputs=ids, attention_mask=mask).logits)
    ERRORS["from_masked_lm"] = err
    assert err < ATOL


def test_language_perceiver_weights_initialise_the_classifier(tmp_path, randomize):
    """Our own format: a saved ``language-perceiver`` → classifier with the same latents for the same input."""
    lm = randomize(create_model("language-perceiver", tiny=True), seed=3).eval()
    save_pretrained(lm, tmp_path / "lm")
    clf = from_language_model(tmp_path / "lm", num_labels=5, decoder_query_residual=False)
    assert clf.config.num_labels == 5 and clf.config.d_latents == lm.config.d_latents
    assert not clf.config.decoder_query_residual
    assert clf.trunk_transfer.skipped == tuple(k for k in lm.state_dict()
                                               if k.startswith(("perceiver.decoder.", "embedding_decoder.")))
    ids, mask = _batch()
    with torch.no_grad():
        a, b = clf(ids, attention_mask=mask), lm(ids, attention_mask=mask)
    assert a.logits.shape == (3, 5)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    # from a model object too, and the classifier saves like any registry model
    again = from_language_model(lm, num_labels=5, decoder_query_residual=False)
    assert again.trunk_transfer.loaded == clf.trunk_transfer.loaded
    save_pretrained(clf, tmp_path / "clf")
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "clf")(ids, mask).logits, clf.eval()(ids, mask).logits)
    with pytest.raises(ValueError, match="trunk sizes come from the language model"):
        from_language_model(lm, num_latents=7)
    # fields that size nothing may differ from the source's: dropout, the forward's defaults
    chatty = from_language_model(lm, num_labels=5, output_hidden_states=True, attention_probs_dropout_prob=0.2)
    assert chatty.eval()(ids, mask).hidden_states is not None
    assert {m.dropout for m in chatty.modules() if isinstance(m, Attention)} == {0.2}
    with pytest.raises(TypeError, match="text-trunk fields"):
        from_language_model(create_model("vision-perceiver-fourier", tiny=True))


def test_report_max_errors():
    """Prints the measured parity errors (run with -s)."""
    for name, err in sorted(ERRORS.items()):
        print(f"{ARCH} {name}: max |ours - transformers| = {err:.2e}")
