"""Pieces shared by the perceiver-pytorch-style models: tying schedules, heads, residual pools, checks."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from ..layers.broadcast import per_sample
from ..layers.dense import Linear
from ..validation import check_finite, check_index_range, check_like

__all__ = [
    "AttentionResidual",
    "ClassifierHead",
    "LayerSchedule",
    "LogitsAlias",
    "MeanOverLatents",
    "PooledClassifierHead",
    "check_input",
    "check_token_ids",
    "flatten_axes",
    "initial_latents",
    "start_hiddens",
    "tie_schedule",
]


class LayerSchedule(nn.ModuleList):
    """perceiver-pytorch's ``model.layers``: the block of every step (tied steps share one), read-only.

    A view of ``model.blocks`` and ``model.block_order``, built on each access: changing it would change
    nothing, so it refuses to be changed (change ``blocks`` or ``block_order`` instead).
    """

    def __init__(self, blocks: nn.ModuleList, order: Sequence[int]) -> None:
        super().__init__([blocks[i] for i in order])
        self._built = True

    def _refuse(self) -> None:
        if getattr(self, "_built", False):
            raise TypeError("model.layers is a read-only view of model.blocks (the unique blocks) and "
                            "model.block_order (which block each step runs); change those instead")

    def __setitem__(self, *args) -> None:
        self._refuse()
        super().__setitem__(*args)

    def __delitem__(self, *args) -> None:
        self._refuse()
        super().__delitem__(*args)

    def __iadd__(self, modules):
        self._refuse()
        return super().__iadd__(modules)

    def append(self, module):
        self._refuse()
        return super().append(module)

    def extend(self, modules):
        self._refuse()
        return super().extend(modules)

    def insert(self, index: int, module) -> None:
        self._refuse()
        super().insert(index, module)

    def pop(self, key):
        self._refuse()
        return super().pop(key)


def tie_schedule(depth: int, weight_tie_layers: bool, *, tie_first: bool = False) -> tuple[int, ...]:
    """Which unique module each of ``depth`` layers uses.

    perceiver-pytorch's ``Perceiver`` keeps layer 0 apart and shares one module among layers
    1..depth-1 (``(0, 1, 1, …)``); its ``PerceiverIO`` shares one among all (``tie_first=True``).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not weight_tie_layers:
        return tuple(range(depth))
    if tie_first:
        return (0,) * depth
    return (0,) + (1,) * (depth - 1)


class MeanOverLatents(nn.Module):
    """``[B, N, D]`` → ``[B, D]``, the mean over the latents."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=-2)


class ClassifierHead(nn.Sequential):
    """Mean over latents → LayerNorm → Linear: ``[B, N, D]`` → ``[B, num_classes]``.

    Indexable as perceiver-pytorch's ``to_logits`` (``[0]`` the pool, ``[1]`` the norm, ``[2]`` or
    ``[-1]`` the projection; ``head[-1] = nn.Linear(D, n)`` swaps it); tensors are ``norm.*``, ``proj.*``.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(OrderedDict(pool=MeanOverLatents(), norm=nn.LayerNorm(dim), proj=Linear(dim, num_classes)))


class PooledClassifierHead(nn.Sequential):
    """LayerNorm → Linear on pooled latents: ``[B, D]`` → ``[B, num_classes]``.

    perceiver-pytorch's variants (``experimental``, ``gated``, ``mixed_latents``) pool *before* their
    ``to_logits``, which is just these two: ``[0]`` the norm, ``[1]`` (or ``[-1]``) the projection; tensors
    are ``norm.*``, ``proj.*`` as in :class:`ClassifierHead`.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(OrderedDict(norm=nn.LayerNorm(dim), proj=Linear(dim, num_classes)))


class LogitsAlias:
    """Mixin: ``to_logits`` (perceiver-pytorch's name for the classifier) reads and replaces ``head``.

    ``model.to_logits = nn.Identity()`` then returns what the head would have received, as in
    perceiver-pytorch (an assignment is not silently kept beside the head the model calls).
    """

    @property
    def to_logits(self) -> nn.Module | None:
        return self.head

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__("head" if name == "to_logits" else name, value)


def start_hiddens(block_outputs: Tensor | Sequence[Tensor] | None, x: Tensor) -> list[Tensor]:
    """The block outputs a forward pass continues from: ``[x]`` when none were given (an empty list stays empty).

    Each given output must have the shape of the latents ``x [B, N, D]``.
    """
    if block_outputs is None:
        return [x]
    hiddens = [block_outputs] if isinstance(block_outputs, Tensor) else list(block_outputs)
    for i, h in enumerate(hiddens):
        if not isinstance(h, Tensor) or h.shape != x.shape:
            got = f"shape {tuple(h.shape)}" if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"block_outputs[{i}] must have the latents' shape {tuple(x.shape)}, got {got}")
    return hiddens


def initial_latents(learned: Tensor, latents: Tensor | None, batch: int, *, like: Tensor) -> Tensor:
    """The latents a forward pass starts from → ``[batch, N, D]``.

    ``latents=None`` gives the model's learned array ``learned [N, D]`` for every sample. Otherwise the
    caller's latents replace it: ``[N', D]`` (shared by the batch) or ``[batch, N', D]``, any ``N'``
    (the attention works for any number of latents), e.g. the previous chunk's
    ``return_embeddings=True`` output to carry a state through a long stream. ``like`` is the input,
    whose dtype and device they must have.
    """
    if latents is None:
        return per_sample(learned.to(like.dtype), batch)
    if not isinstance(latents, Tensor) or not latents.is_floating_point():
        got = f"dtype {latents.dtype}" if isinstance(latents, Tensor) else type(latents).__name__
        raise TypeError(f"latents must be a floating-point tensor, got {got}")
    dim = learned.shape[-1]
    if latents.ndim not in (2, 3) or latents.shape[-1] != dim or latents.shape[-2] == 0:
        raise ValueError(f"latents must be [num_latents, {dim}] or [batch, num_latents, {dim}], "
                         f"got shape {tuple(latents.shape)}")
    if latents.ndim == 3 and latents.shape[0] != batch:
        raise ValueError(f"latents have batch size {latents.shape[0]} but the input has {batch}")
    if latents.device != like.device or (latents.dtype != like.dtype
                                         and not torch.is_autocast_enabled(like.device.type)):
        raise ValueError(f"latents ({latents.dtype}, {latents.device}) must match the input "
                         f"({like.dtype}, {like.device})")
    check_finite(latents, "latents")
    return per_sample(latents, batch) if latents.ndim == 2 else latents


class AttentionResidual(nn.Module):
    """A learned softmax pool over all earlier block outputs, replacing the plain residual stream.

    perceiver-pytorch's ``attn_residual`` option (arXiv 2603.15031 with an Enformer-style pool):
    logits ``Linear(rank→dim)(Linear(dim→rank)(RMSNorm(h)))`` per layer, softmax over layers.
    """

    def __init__(self, dim: int, rank: int = 64) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.down = Linear(dim, rank, bias=False)
        self.up = Linear(rank, dim, bias=False)

    def forward(self, block_outputs: Sequence[Tensor]) -> Tensor:
        """``L × [B, N, D]`` → ``[B, N, D]``."""
        past = torch.stack(list(block_outputs), dim=2)  # [B, N, L, D]
        weights = self.up(self.down(self.norm(past))).softmax(dim=-2)
        return (past * weights).sum(dim=-2)


def check_input(
    data: Tensor, *, name: str, channels: int, axes: int | None = None, module: nn.Module | None = None,
    why: str | None = None,
) -> None:
    """Raise a ValueError/TypeError naming what was expected when ``data`` cannot be a model input.

    Args:
        channels: expected size of the last (channel) axis.
        axes: expected number of index axes between batch and channels (``None``: any ≥ 1).
        module: the model ``data`` goes into: its device and parameter dtype must match.
        why: the reason for that number of axes, in the rank error (default ``input_axis=<axes>``).

    NaN/Inf values raise too (see :mod:`perceivers.validation` for the policy and how to turn it off).
    """
    if not isinstance(data, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(data).__name__}")
    if not data.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {data.dtype}")
    if axes is not None and data.ndim != axes + 2:
        raise ValueError(
            f"{name} must have shape [batch, {', '.join(['n'] * axes)}, channels] ({axes + 2} dims, "
            f"{why or f'input_axis={axes}'}), got {data.ndim} dims with shape {tuple(data.shape)}"
        )
    if axes is None and data.ndim < 3:
        raise ValueError(f"{name} must have shape [batch, ..., channels], got {tuple(data.shape)}")
    if data.shape[-1] != channels:
        raise ValueError(f"{name} must have {channels} channels in its last axis, got {data.shape[-1]} "
                         f"(shape {tuple(data.shape)})")
    if data.shape[0] == 0 or math.prod(data.shape[1:-1]) == 0:  # no channels can be right: positions only
        raise ValueError(f"{name} is empty: shape {tuple(data.shape)}")
    if module is not None:
        check_like(data, module, name)
    check_finite(data, name)


def check_token_ids(
    ids: Tensor, *, name: str, num_tokens: int, max_seq_len: int | None, module: nn.Module
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``ids`` is a non-empty ``[B, L]`` int64/int32 tensor of ids
    below ``num_tokens`` on ``module``'s device, with ``L <= max_seq_len`` (``None``: any length)."""
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = f"dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be token ids, an int64 (or int32) tensor, got {got}")
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, seq_len], got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(ids.shape)}")
    if max_seq_len is not None and ids.shape[1] > max_seq_len:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds max_seq_len={max_seq_len}")
    check_like(ids, module, name, dtype=False)
    check_index_range(ids, num_tokens, "token ids")


def flatten_axes(data: Tensor) -> Tensor:
    """``[B, *axes, C]`` → ``[B, N, C]``."""
    return rearrange(data, "b ... c -> b (...) c")
