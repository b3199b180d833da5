"""Text (UTF-8 byte ids) pre- and postprocessing of the masked language model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...configurable import configurable
from ...layers import TrainablePositionEncoding
from ...layers.dense import linear
from ...validation import check_index_range, check_tensor
from .base import Preprocessed

__all__ = ["EmbeddingDecoder", "TextPreprocessor"]


@configurable
class TextPreprocessor(nn.Module):
    """Token ids ``[B, L]`` → ``embedding(ids) + positions[:L]`` ``[B, L, d_model]`` (positions are *added*).

    The embedding table is Haiku ``hk.Embed``-initialised (truncated normal, std 1); the learned
    position table ``[max_seq_len, d_model]`` has std 0.02.
    """

    def __init__(self, vocab_size: int = 262, d_model: int = 768, max_seq_len: int = 2048) -> None:
        super().__init__()
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.num_channels = d_model
        self.embeddings = nn.Embedding(vocab_size, d_model)
        nn.init.trunc_normal_(self.embeddings.weight, std=1.0, a=-2.0, b=2.0)
        self.position_embeddings = TrainablePositionEncoding(max_seq_len, d_model)

    def forward(self, ids: Tensor) -> Preprocessed:
        """``ids [B, L]`` (integer, ``L <= max_seq_len``) → ``Preprocessed(inputs [B, L, d_model], None, embeddings)``."""
        check_tensor(ids, "text inputs", kind=None, layout="[batch, length] integer ids")
        if ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"text inputs must be integer ids [batch, length], got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position_embeddings={self.max_seq_len}")
        check_index_range(ids, self.vocab_size, "token ids")
        emb = self.embeddings(ids.long())
        return Preprocessed(emb + self.position_embeddings.embeddings[: ids.shape[1]], None, emb)


@configurable
class EmbeddingDecoder(nn.Module):
    """Tied output layer: ``logits = hidden · Eᵀ + bias`` with ``E`` the input embedding table.

    The table is passed at call time (the task model passes its input embedding), so the weight is
    stored once and the tie is visible where it is used.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor, embedding_weight: Tensor) -> Tensor:
        """``hidden [B, L, d_model]``, ``embedding_weight [vocab, d_model]`` → ``[B, L, vocab]``."""
        if embedding_weight.shape[0] != self.vocab_size:
            raise ValueError(f"embedding table has {embedding_weight.shape[0]} rows, expected {self.vocab_size}")
        return linear(hidden, embedding_weight, self.bias)
