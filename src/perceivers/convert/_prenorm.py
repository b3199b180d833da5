"""Shared key translation for perceiver-pytorch-style ``PreNorm(Attention)`` / ``PreNorm(FeedForward)`` modules.

Used by the converters of the multi-modality fork and of perceiver-pytorch's variants. Foreign key names live only
here and in the converters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["TiedCopyMismatch", "prenorm_attention", "prenorm_feedforward", "put"]


class TiedCopyMismatch(ValueError):
    """Two source tensors that a tying schedule maps to one target key differ."""


def put(out: dict[str, Tensor], key: str, value: Tensor, source: str) -> None:
    """Store ``value`` at ``key``; a second store (a tied copy) must be identical."""
    if key in out:
        ref = out[key]
        if ref.shape != value.shape or not torch.equal(ref, value):
            raise TiedCopyMismatch(f"{source} differs from the tied copy already stored as {key}")
        return
    out[key] = value


def prenorm_attention(rest: str, value: Tensor, *, attn: str, norms: Mapping[str, str]) -> dict[str, Tensor]:
    """Translate ``rest`` inside ``PreNorm(Attention)`` (``norm``, ``norm_context``, ``fn.to_q``, ``fn.to_kv``,
    ``fn.to_out`` or ``fn.to_out.0``) to keys of a :class:`~perceivers.layers.Attention` at ``attn`` and norms
    at ``norms[name]``. The fused ``to_kv`` is split into ``to_k`` / ``to_v``.

    Raises:
        KeyError: ``rest`` is not part of that layout.
    """
    name, _, param = rest.rpartition(".")
    if name in norms:
        return {f"{norms[name]}.{param}": value}
    if name == "fn.to_q":
        return {f"{attn}.to_q.{param}": value}
    if name == "fn.to_kv":
        k, v = value.chunk(2, dim=0)
        return {f"{attn}.to_k.{param}": k.clone(), f"{attn}.to_v.{param}": v.clone()}
    if name in ("fn.to_out", "fn.to_out.0"):
        return {f"{attn}.to_out.{param}": value}
    raise KeyError(rest)


def prenorm_feedforward(rest: str, value: Tensor, *, mlp: str, norm: str) -> dict[str, Tensor]:
    """Translate ``rest`` inside ``PreNorm(FeedForward)`` to a :class:`~perceivers.layers.FeedForward` at ``mlp``.

    ``fn.net.0`` is the first linear layer; the second is ``fn.net.2`` (perceiver-pytorch: Linear, GEGLU, Linear,
    Dropout) or ``fn.net.3`` (the multi-modality fork: Linear, act, Dropout, Linear).
    """
    name, _, param = rest.rpartition(".")
    if name == "norm":
        return {f"{norm}.{param}": value}
    if name == "fn.net.0":
        return {f"{mlp}.fc1.{param}": value}
    if name in ("fn.net.2", "fn.net.3"):
        return {f"{mlp}.fc2.{param}": value}
    raise KeyError(rest)
