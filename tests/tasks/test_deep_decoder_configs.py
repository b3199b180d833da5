"""Task configs expose the deeper decoder (``decoder_num_cross_attends``, ``decoder_num_self_attends_per_cross``)."""

from __future__ import annotations

import pytest
import torch

import perceivers
from perceivers.convert.transformers import transformers_config
from perceivers.tasks import from_language_model

DEEP = {"decoder_num_cross_attends": 2, "decoder_num_self_attends_per_cross": 1}


def test_defaults_build_the_one_layer_decoder() -> None:
    lm = perceivers.create_model("language-perceiver", tiny=True)
    assert not any(k.startswith(("perceiver.decoder.extra_cross_attentions.", "perceiver.decoder.self_attends."))
                   for k in lm.state_dict())
    assert lm.config.decoder_num_cross_attends == 1 and lm.config.decoder_num_self_attends_per_cross == 0


def test_deep_masked_lm_hides_padding_and_decodes_short_sequences_as_padded() -> None:
    torch.manual_seed(0)
    lm = perceivers.create_model("language-perceiver", tiny=True, **DEEP).eval()
    assert len(lm.perceiver.decoder.extra_cross_attentions) == 1 and len(lm.perceiver.decoder.self_attends) == 2
    ids = torch.randint(0, 262, (2, 16))
    mask = torch.arange(16)[None] < torch.tensor([[10], [16]])
    other = torch.where(mask, ids, (ids + 5) % 262)
    with torch.no_grad():
        a, b = lm(ids, attention_mask=mask).logits, lm(other, attention_mask=mask).logits
        torch.testing.assert_close(a[mask], b[mask], atol=1e-4, rtol=1e-4)
        short = lm(ids[:1, :10]).logits  # the first 10 queries only = 16 queries with the last 6 masked
        torch.testing.assert_close(short, a[:1, :10], atol=1e-4, rtol=1e-4)


def test_token_classifier_takes_the_deep_decoder_from_the_language_model() -> None:
    torch.manual_seed(0)
    lm = perceivers.create_model("language-perceiver", tiny=True, **DEEP)
    tagger = from_language_model(lm, num_labels=3, variant="language-perceiver-token-classifier")
    assert tagger.config.decoder_num_self_attends_per_cross == 1
    copied = set(tagger.trunk_transfer.loaded)
    assert {k for k in tagger.state_dict() if ".extra_cross_attentions." in k or "decoder.self_attends." in k} <= copied


def test_classifiers_take_a_deeper_cross_attention_stack() -> None:
    for name in ("vision-perceiver-fourier", "language-perceiver-classifier"):
        model = perceivers.create_model(name, tiny=True, decoder_num_cross_attends=2)
        assert len(model.perceiver.decoder.decoder.extra_cross_attentions) == 1


def test_transformers_format_refuses_a_deeper_decoder() -> None:
    with pytest.raises(ValueError, match="one cross-attention and no query self-attention"):
        transformers_config(perceivers.create_model("language-perceiver", tiny=True, **DEEP))
