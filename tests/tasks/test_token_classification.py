"""``language-perceiver-token-classifier``: one label per byte, started from the masked LM."""

import pytest
import torch
import torch.nn.functional as F

from perceivers import create_model, from_pretrained, save_pretrained
from perceivers.data import ByteTokenizer
from perceivers.tasks import TokenClassifier, from_language_model

TOKEN = "language-perceiver-token-classifier"


def _batch(length: int = 16):
    ids = torch.randint(6, 262, (3, length))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = 0
    return ids, mask


def test_started_from_the_masked_lm_it_reuses_the_per_position_decoder(randomize):
    """Logits = the masked LM's per-position decoder features through the new Linear (same weights)."""
    lm = randomize(create_model("language-perceiver", tiny=True), seed=1).eval()
    tagger = from_language_model(lm, num_labels=4, variant=TOKEN, labels=["O", "B", "I", "X"]).eval()
    assert isinstance(tagger, TokenClassifier)
    assert tagger.trunk_transfer.initialised == ("perceiver.decoder.output.weight", "perceiver.decoder.output.bias")
    assert tagger.trunk_transfer.skipped == ("embedding_decoder.bias",)
    assert tagger.config.id2label == {0: "O", 1: "B", 2: "I", 3: "X"}
    ids, mask = _batch()
    with torch.no_grad():
        features = lm.perceiver(ids, input_mask=mask, query_mask=mask, query_kwargs={"length": 16}).logits
        out = tagger(ids, attention_mask=mask)
        expected = tagger.perceiver.decoder.output(features)
    assert out.logits.shape == (3, 16, 4)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.last_hidden_state, lm(ids, attention_mask=mask).last_hidden_state)


def test_loss_ignores_minus_100_and_matches_cross_entropy():
    torch.manual_seed(0)
    tagger = create_model(TOKEN, tiny=True).eval()
    ids, mask = _batch()
    labels = torch.randint(0, 5, ids.shape)
    labels[1, 11:] = -100
    out = tagger(ids, attention_mask=mask, labels=labels)
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))
    loss, logits = tagger(ids, mask, labels, return_dict=False)[:2]
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    short = tagger(ids[:, :9], attention_mask=mask[:, :9])  # fewer positions than max_position_embeddings
    assert short.logits.shape == (3, 9, 5)


def test_learns_a_byte_tagging_rule():
    """digit / letter / other per byte: the loss falls well below chance in a 150 steps."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    texts = ["call 555 0199 now", "room 12b at 9am", "pay 40 eur by 3rd", "flight LH 401 at 7",
             "order 88 ok", "zip 10115 berlin", "gate b22", "2 cats and 3 dogs"]
    enc = tok(texts, padding="max_length", max_length=24)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = torch.full_like(ids, -100)
    for row, text in enumerate(texts):
        for col, ch in enumerate(text):
            labels[row, col] = 0 if ch.isdigit() else 1 if ch.isalpha() else 2
    model = create_model(TOKEN, tiny=True, max_position_embeddings=24, num_labels=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    keep = labels != -100
    accuracy = (out.logits.argmax(-1)[keep] == labels[keep]).float().mean().item()
    assert first > 0.9 and out.loss.item() < 0.2 * first, (first, out.loss.item())
    assert accuracy > 0.95


def test_saves_and_loads_like_every_registered_model(tmp_path):
    torch.manual_seed(0)
    tagger = create_model(TOKEN, tiny=True, labels=[f"T{i}" for i in range(5)]).eval()
    save_pretrained(tagger, tmp_path / "tagger")
    again = from_pretrained(tmp_path / "tagger").eval()
    ids, mask = _batch()
    assert again.config.labels == tagger.config.labels
    with torch.no_grad():
        assert torch.equal(again(ids, mask).logits, tagger(ids, mask).logits)


def test_bad_input_and_bad_transfers_are_refused(randomize):
    tagger = create_model(TOKEN, tiny=True)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="labels must have the shape of inputs"):
        tagger(ids, mask, labels=torch.zeros(3, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be < num_labels=5"):
        tagger(ids, mask, labels=torch.full_like(ids, 7))
    with pytest.raises(TypeError):
        tagger(ids.float(), mask)
    lm = create_model("language-perceiver", tiny=True)
    with pytest.raises(ValueError, match="variant must be"):
        from_language_model(lm, variant="vision-perceiver-fourier")
    with pytest.raises(ValueError, match="num_decoder_heads=1 \\(source has 2\\)"):
        from_language_model(lm, variant=TOKEN, num_decoder_heads=1)
