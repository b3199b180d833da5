"""ByteTokenizer: DeepMind ids, padding/masks, and parity with transformers' PerceiverTokenizer."""

import pytest
import torch

from perceivers.data import ByteTokenizer

MIXED = [
    "This is an incomplete sentence where some words are missing.",
    "héllo wörld — ça va ? 你好，世界 🙂🚀",
    "Привет, мир! مرحبا بالعالم שלום עולם",
    "naïve café\tnew\nline \x00 nul",
    "",
]


def test_ids_are_bytes_plus_six():
    tok = ByteTokenizer()
    assert tok.encode("a") == [ord("a") + 6]
    assert tok.encode("é") == [0xC3 + 6, 0xA9 + 6]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3, 4, 5)
    assert len(tok) == tok.vocab_size == 262


def test_official_layout_pads_to_max_length_with_mask():
    tok = ByteTokenizer(max_length=2048)
    batch = tok(["abc", "hello"])
    assert batch["input_ids"].shape == (2, 2048) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0, :3].tolist() == [1, 1, 1] and batch["attention_mask"][0, 3:].sum() == 0
    assert batch["input_ids"][1, :5].tolist() == [b + 6 for b in b"hello"]
    assert batch["input_ids"][1, 5:].eq(0).all()


def test_colab_mask_example_roundtrip():
    tok = ByteTokenizer()
    text = "This is an incomplete sentence where some words are missing."
    ids = tok(text)["input_ids"][0]
    ids[51:60] = tok.mask_id
    assert tok.decode(ids) == text[:51] + text[60:]
    assert text[51:60] == " missing."


def test_decode_drops_reserved_and_replaces_invalid_utf8():
    tok = ByteTokenizer()
    ids = [4, 0xC3 + 6, 3, 0xA9 + 6, 5, 0, ord("x") + 6, 0xFF + 6]
    assert tok.decode(ids) == "éx\ufffd"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([262])


def test_padding_modes_and_truncation():
    tok = ByteTokenizer(max_length=4)
    assert tok(["ab", "abcdef"], padding="longest")["input_ids"].shape == (2, 4)
    assert tok(["ab", "abc"], padding="longest")["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="exceeds max_length"):
        tok("abcdef", truncation=False)
    with pytest.raises(ValueError, match="equal lengths"):
        tok(["a", "ab"], padding="none")
    with pytest.raises(ValueError, match="padding must be"):
        tok("a", padding="sideways")


def test_special_tokens_layout_and_parsing():
    tok = ByteTokenizer(add_special_tokens=True, parse_special_tokens=True)
    assert tok.encode("a[MASK]b") == [4, ord("a") + 6, 3, ord("b") + 6, 5]
    assert tok.encode("a", "b") == [4, ord("a") + 6, 5, ord("b") + 6, 5]
    plain = ByteTokenizer()
    assert plain.encode("[MASK]") == [b + 6 for b in b"[MASK]"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.PerceiverTokenizer()


@pytest.mark.parametrize("text", MIXED + ["héllo [MASK]", "[CLS] a [SEP] b [MASK][MASK]"])
def test_parity_with_transformers(hf_tokenizer, text):
    ours = ByteTokenizer(max_length=96, add_special_tokens=True, parse_special_tokens=True)
    ref = hf_tokenizer(text, padding="max_length", max_length=96, truncation=True, return_tensors="pt")
    got = ours(text)
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["attention_mask"], ref["attention_mask"])
    assert ours.decode(got["input_ids"][0]) == hf_tokenizer.decode(ref["input_ids"][0], skip_special_tokens=True)


def test_parity_with_transformers_batch_and_pairs(hf_tokenizer):
    ours = ByteTokenizer(max_length=256, add_special_tokens=True, parse_special_tokens=True)
    ref = hf_tokenizer(MIXED, MIXED[::-1], padding="longest", return_tensors="pt")
    got = ours(MIXED, MIXED[::-1], padding="longest")
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["attention_mask"], ref["attention_mask"])
    raw = hf_tokenizer(MIXED, add_special_tokens=False)["input_ids"]
    assert [ByteTokenizer().encode(t) for t in MIXED] == raw


@pytest.mark.parametrize("max_length", [3, 5, 8])
def test_truncation_keeps_special_tokens_like_transformers(hf_tokenizer, max_length):
    ours = ByteTokenizer(max_length=max_length, add_special_tokens=True, parse_special_tokens=True)
    for texts, pairs in [(["abcdefghij", "ab"], None), (["abcdefghij", "a"], ["xyz", "héllo wörld"])]:
        ref = hf_tokenizer(texts, pairs, padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt")
        got = ours(texts, pairs)
        assert torch.equal(got["input_ids"], ref["input_ids"])
        assert torch.equal(got["attention_mask"], ref["attention_mask"])
    with pytest.raises(ValueError, match="exceeds max_length=2"):  # [CLS] a [SEP] b [SEP] needs 3 ids at least
        ByteTokenizer(max_length=2, add_special_tokens=True)("abc", "def")


@pytest.mark.parametrize("pair", [5, b"bytes"])
def test_pair_of_the_wrong_type_is_a_type_error(pair):
    """A non-str pair failed with AttributeError ('int' object has no attribute 'encode')."""
    with pytest.raises(TypeError, match=f"pair must be a str or None, got {type(pair).__name__}"):
        ByteTokenizer().encode("a", pair)
    with pytest.raises(TypeError, match="pair must be a str or None"):
        ByteTokenizer()(["a"], [pair])


def test_pair_truncation_matches_transformers_at_every_length(hf_tokenizer):
    """Every split of the budget between two texts, against transformers' ``longest_first``."""
    ours = ByteTokenizer(max_length=9, add_special_tokens=True, parse_special_tokens=True)
    texts, pairs = zip(*[("a" * i, "b" * j) for i in range(12) for j in range(12)])
    ref = hf_tokenizer(list(texts), list(pairs), padding="max_length", max_length=9, truncation=True,
                       return_tensors="pt")
    assert torch.equal(ours(list(texts), list(pairs))["input_ids"], ref["input_ids"])


def test_truncating_a_long_text_is_linear():
    """A 1 MB text and a 0.5 MB pair cut to 2048 ids: the texts were cut one byte per step, each step copying
    the rest (40 kB took 1.2 s, so 1 MB took minutes); now a slice."""
    tokenizer = ByteTokenizer(max_length=2048, add_special_tokens=True)
    ids = tokenizer(["a" * 1_000_000], pairs=["b" * 500_000])["input_ids"][0]
    a, b = ord("a") + tokenizer.offset, ord("b") + tokenizer.offset
    assert ids.tolist() == [4, *[a] * 1023, 5, *[b] * 1022, 5]
