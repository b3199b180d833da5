"""UTF-8 byte tokenizer of DeepMind's language Perceiver IO.

Ids: ``byte + 6`` for the 256 byte values; six reserved ids below them
(PAD 0, BOS 1, EOS 2, MASK 3, CLS 4, SEP 5); vocabulary 262. The official model sees the raw bytes
with no CLS/SEP, right-padded with PAD to 2048, plus a mask (1 = real byte, 0 = padding);
``add_special_tokens=True`` gives transformers' ``[CLS] X [SEP]`` layout instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["SPECIAL_TOKENS", "ByteTokenizer"]

PAD_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID = range(6)
SPECIAL_TOKENS: dict[str, int] = {
    "[PAD]": PAD_ID, "[BOS]": BOS_ID, "[EOS]": EOS_ID, "[MASK]": MASK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID,
}
_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

Padding = Literal["max_length", "longest", "none"]


class ByteTokenizer:
    """Encode text to byte ids and back.

    Args:
        max_length: length that ``padding="max_length"`` pads to and ``truncation`` cuts at
            (2048 for the released model).
        add_special_tokens: wrap each text in ``[CLS] … [SEP]`` (transformers' layout; DeepMind's
            colab adds nothing).
        parse_special_tokens: read the literal strings ``[MASK]``, ``[CLS]``, … in the text as one
            special id each (transformers does; DeepMind's tokenizer encodes them as bytes).
    """

    offset = 6
    vocab_size = 262
    pad_id, bos_id, eos_id, mask_id, cls_id, sep_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID

    def __init__(
        self,
        max_length: int = 2048,
        *,
        add_special_tokens: bool = False,
        parse_special_tokens: bool = False,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        self.parse_special_tokens = parse_special_tokens

    def __len__(self) -> int:
        return self.vocab_size

    def encode(
        self,
        text: str,
        pair: str | None = None,
        *,
        add_special_tokens: bool | None = None,
        parse_special_tokens: bool | None = None,
    ) -> list[int]:
        """``text`` (and an optional second ``pair`` text) → ids, unpadded and untruncated.

        With special tokens the layout is ``[CLS] text [SEP]`` or ``[CLS] text [SEP] pair [SEP]``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if pair is not None and not isinstance(pair, str):
            raise TypeError(f"pair must be a str or None, got {type(pair).__name__}")
        add = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        parse = self.parse_special_tokens if parse_special_tokens is None else parse_special_tokens
        ids = self._bytes_to_ids(text, parse)
        if pair is not None:
            pair_ids = self._bytes_to_ids(pair, parse)
            return [CLS_ID, *ids, SEP_ID, *pair_ids, SEP_ID] if add else ids + pair_ids
        return [CLS_ID, *ids, SEP_ID] if add else ids

    def _encode_fitted(
        self, text: str, pair: str | None, add: bool, limit: int | None, parse: bool | None = None
    ) -> list[int]:
        """:meth:`encode`, with the texts cut to fit ``limit`` tokens (None: no cut) as transformers cuts them:
        a byte at a time from the end of the longer text (the pair on a tie), so the special ids stay."""
        if pair is not None and not isinstance(pair, str):
            raise TypeError(f"pair must be a str or None, got {type(pair).__name__}")
        a = self.encode(text, add_special_tokens=False, parse_special_tokens=parse)
        b = None if pair is None else self.encode(pair, add_special_tokens=False, parse_special_tokens=parse)
        if limit is not None:
            budget = max(0, limit - (0 if not add else 2 if b is None else 3))
            if b is None:
                a = a[:budget]
            else:
                keep_a, keep_b = _longest_first(len(a), len(b), budget)
                a, b = a[:keep_a], b[:keep_b]
        if b is None:
            return [CLS_ID, *a, SEP_ID] if add else a
        return [CLS_ID, *a, SEP_ID, *b, SEP_ID] if add else a + b

    def _bytes_to_ids(self, text: str, parse: bool) -> list[int]:
        if not parse:
            return [b + self.offset for b in text.encode("utf-8")]
        ids: list[int] = []
        for piece in _SPECIAL_PATTERN.split(text):
            if piece in SPECIAL_TOKENS:
                ids.append(SPECIAL_TOKENS[piece])
            elif piece:
                ids.extend(b + self.offset for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids → text: reserved ids (< 6) are dropped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode takes one sequence [n]; use batch_decode for {tuple(ids.shape)}")
            if ids.is_floating_point() or ids.dtype == torch.bool:
                raise TypeError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if isinstance(i, bool) or not hasattr(i, "__index__"):
                raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__})")
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i >= self.offset:
                out.append(i - self.offset)
        return out.decode("utf-8", errors="replace")

    def batch_decode(self, ids: Sequence[Sequence[int]] | Tensor) -> list[str]:
        """``[B, n]`` ids → ``B`` strings (see :meth:`decode`)."""
        return [self.decode(row) for row in ids]

    def __call__(
        self,
        texts: str | Sequence[str],
        pairs: str | Sequence[str] | None = None,
        *,
        padding: Padding | bool = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        add_special_tokens: bool | None = None,
        parse_special_tokens: bool | None = None,
    ) -> dict[str, Tensor]:
        """Encode a batch into tensors.

        Args:
            texts: one string or a list of ``B`` strings.
            pairs: optional second texts (one per text).
            padding: ``"max_length"`` (pad to ``max_length``; the official input), ``"longest"``
                (pad to the longest in the batch), ``"none"``/False (needs equal lengths).
            truncation: cut sequences longer than ``max_length`` (else raise ``ValueError``): the texts lose
                bytes at their end (the longer of a pair first), so ``[CLS]``/``[SEP]`` stay, as transformers cuts.

        Returns:
            ``input_ids`` int64 ``[B, n]`` (right-padded with PAD 0) and ``attention_mask``
            int64 ``[B, n]`` (1 = real token, 0 = padding).
        """
        single = isinstance(texts, str)
        if not single and (isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        texts = [texts] if single else list(texts)
        if not texts:
            raise ValueError("texts is empty: pass at least one string")
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(pairs)} pairs")
        max_length = self.max_length if max_length is None else max_length
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        add = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        seqs = [
            self._encode_fitted(t, None if pairs is None else pairs[i], add, max_length if truncation else None,
                                   parse_special_tokens)
            for i, t in enumerate(texts)
        ]
        too_long = [len(s) for s in seqs if len(s) > max_length]
        if too_long:
            raise ValueError(f"sequence of {max(too_long)} tokens exceeds max_length={max_length}")
        if padding is True:
            padding = "longest"
        if padding in ("none", False):
            lengths = {len(s) for s in seqs}
            if len(lengths) > 1:
                raise ValueError(f"padding='none' needs equal lengths, got {sorted(lengths)}")
            width = lengths.pop() if lengths else 0
        elif padding == "longest":
            width = max((len(s) for s in seqs), default=0)
        elif padding == "max_length":
            width = max_length
        else:
            raise ValueError(f"padding must be 'max_length', 'longest' or 'none', got {padding!r}")
        input_ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[row, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """How many ids of two texts stay when they are cut to ``budget`` in all as transformers' ``longest_first``
    cuts: one at a time from the end of the longer (the second on a tie), computed without the loop."""
    excess = len_a + len_b - budget
    if excess <= 0:
        return len_a, len_b
    diff = abs(len_a - len_b)
    if excess <= diff:
        return (len_a - excess, len_b) if len_a > len_b else (len_a, len_b - excess)
    even, rest = min(len_a, len_b), excess - diff  # level, then one from each in turn, the second first
    return even - rest // 2, even - (rest + 1) // 2
