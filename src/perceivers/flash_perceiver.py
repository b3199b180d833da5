"""kklemon's FlashPerceiver (PyPI ``flash-perceiver`` 0.2.0) API on perceivers' layers.

Changing ``from flash_perceiver import Perceiver, PerceiverIO`` to
``from perceivers.flash_perceiver import Perceiver, PerceiverIO`` gives the same model: the same
constructor and forward keywords, the same outputs and the same ``state_dict`` keys (FlashPerceiver
checkpoints load with ``load_state_dict(strict=True)``). It runs on any device and dtype: attention
goes through ``torch.nn.functional.scaled_dot_product_attention`` (no attention matrix in memory) or,
on CPU where they are faster, :mod:`perceivers.layers.onednn_attention`'s chunked products, instead of
flash-attn's CUDA kernels, so neither CUDA nor half precision is needed.

The structure, as flash-attn's ``Block`` and ``MHA`` compute it for FlashPerceiver:

* every block is ``y = x + Attn(LN1(x), context)`` then ``MLP(LN2(y))`` — **without** the final
  residual add (flash-attn's pre-norm ``Block`` returns ``(hidden_states, residual)`` and
  FlashPerceiver keeps only the first);
* the cross-attention context (the input, with optional learned *zero tokens* prepended) is not
  layer-normed; its query and key/value projections (``Wq``, ``Wkv``) have no bias, the fused
  self-attention projection ``Wqkv`` has one; key/value channels are ordered ``(k|v, head, d)``;
* MLPs are ``GatedMlp`` (``fc2(a · sigmoid(b))`` with ``[a, b] = fc1(x)``, hidden width
  ``latent_dim · 4`` rounded up to a multiple of 128) or ``Mlp`` (exact GELU, hidden ``4 · dim``);
* latent self-attention may rotate the first ``latent_rotary_emb_dim`` channels of each query/key
  head ("rotate half", base 10000, latent ``i`` at position ``i``).

Also here: FlashPerceiver's utilities (:class:`ImageAdapter`, the positional encodings,
:func:`random_mask`, :func:`meshgrid`, :func:`numel`, :class:`CosineWithWarmupLR`).
Differences from the published package are listed in ``docs/flash-perceiver.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from perceivers.configurable import configurable

from .layers.attention import attend_heads, attention_weights, check_mask
from .layers.broadcast import per_sample
from .layers.dense import Linear, glu, linear, linear_glu
from .layers.mlp import FeedForward, _plain
from .layers.position import _feature_dtype, linear_positions
from .layers.rotary import RotaryEmbedding, rotate
from .validation import check_like, check_tensor

__all__ = [
    "BasePositionalEncoding",
    "Block",
    "CosineWithWarmupLR",
    "CrossAttention",
    "FlashPerceiver",
    "FlashPerceiverIO",
    "FourierPositionalEncoding",
    "GatedMlp",
    "GaussianFourierFeatureTransform",
    "IdentityPositionalEncoding",
    "ImageAdapter",
    "NeRFPositionalEncoding",
    "Perceiver",
    "PerceiverBase",
    "PerceiverIO",
    "SelfAttention",
    "TokenDrop",
    "get_encoder",
    "meshgrid",
    "numel",
    "random_mask",
]

OutputMode = Literal["average", "concat", "first", "mean"]
Inputs = Tensor | Sequence[Tensor]
Masks = Tensor | Sequence[Tensor | None] | None


# ----------------------------------------------------------------------------------------- attention


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float,
            return_weights: bool) -> tuple[Tensor, Tensor | None]:
    """``softmax(q kᵀ / √d) v`` per head: ``q [B, H, Q, d]``, ``k, v [B, H, K, d]``, ``mask [B, K]`` True = attend.

    A sample whose keys are all masked attends all of them evenly, as flash-attn's masked torch path
    does (it adds -10000 to every masked score). Weights ``[B, H, Q, K]`` (the softmax, before
    dropout) are computed only when asked for; otherwise they are never built whole.
    """
    attn_mask = None
    if mask is not None:
        attn_mask = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]  # [B, 1, 1, K]
    if not return_weights:
        return attend_heads(q, k, v, attn_mask, dropout), None
    weights = attention_weights(q, k, attn_mask)  # [B, H, Q, K]
    return torch.matmul(F.dropout(weights, dropout), v), weights


def _heads(num_heads: int | None, head_dim: int | None, dim: int, role: str) -> tuple[int, int]:
    """FlashPerceiver's head arithmetic: either may be None (then derived from ``dim``), not both."""
    if num_heads is None and head_dim is None:
        raise ValueError(f"{role}: give the number of heads or the head dimension (both are None)")
    if num_heads is None:
        num_heads = dim // head_dim
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"{role}: dim {dim} is not divisible by {num_heads} heads (head dim None)")
        head_dim = dim // num_heads
    if num_heads < 1 or head_dim < 1:
        raise ValueError(f"{role}: need >= 1 head of >= 1 channel, got {num_heads} heads of {head_dim}")
    return num_heads, head_dim


class CrossAttention(nn.Module):
    """Queries ``x [B, Q, dim]`` attend ``context [B, K, kv_dim]`` (flash-attn ``MHA(cross_attn=True)`` keys).

    ``Wq`` and ``Wkv`` (keys then values, each ``num_heads × head_dim``) have no bias; ``out_proj`` has one.
    """

    def __init__(self, dim: int, kv_dim: int, *, num_heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.kv_dim, self.dropout = num_heads, head_dim, kv_dim, dropout
        self.Wq = Linear(dim, inner, bias=False)
        self.Wkv = Linear(kv_dim, 2 * inner, bias=False)
        self.out_proj = Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None,
                return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """→ ``([B, Q, dim], weights [B, H, Q, K] or None)``."""
        q = rearrange(self.Wq(x), "b n (h d) -> b h n d", h=self.num_heads)
        # keys and values as two products: splitting one product's output costs two copies of it in the backward
        k, v = (rearrange(linear(context, w), "b n (h d) -> b h n d", h=self.num_heads) for w in self.Wkv.weight.chunk(2))
        out, weights = _attend(q, k, v, mask, self.dropout if self.training else 0.0, return_weights)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)")), weights


class SelfAttention(nn.Module):
    """Self-attention of ``x [B, N, dim]`` with a fused ``Wqkv`` (queries, keys, values; with bias).

    ``rotary_dim`` > 0 rotates the first ``rotary_dim`` channels of every query and key head by the
    token's index (flash-attn's non-interleaved rotary, base 10000); computed in float32.
    """

    def __init__(self, dim: int, *, num_heads: int, head_dim: int, dropout: float = 0.0, rotary_dim: int = 0) -> None:
        super().__init__()
        if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
            raise ValueError(f"latent_rotary_emb_dim must be even and in [0, {head_dim}] (the head dim), "
                             f"got {rotary_dim}")
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        self.Wqkv = Linear(dim, 3 * inner)
        self.out_proj = Linear(inner, dim)
        self.rotary_dim = rotary_dim
        self.rotary = RotaryEmbedding(rotary_dim)  # no state-dict entry, as flash-attn's

    def forward(self, x: Tensor, return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """→ ``([B, N, dim], weights [B, H, N, N] or None)``."""
        q, k, v = rearrange(self.Wqkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if self.rotary_dim:
            angles = self.rotary(torch.arange(x.shape[1], device=x.device))  # [N, r], float32
            q, k = rotate(q, angles), rotate(k, angles)
        out, weights = _attend(q, k, v, None, self.dropout if self.training else 0.0, return_weights)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)")), weights


# --------------------------------------------------------------------------------------- MLP, block


class GatedMlp(nn.Module):
    """flash-attn's ``GatedMlp`` with its default sigmoid gate: ``fc2(a · sigmoid(b))``, ``[a, b] = fc1(x)``.

    The hidden width is rounded up to a multiple of ``multiple_of`` (128).
    """

    def __init__(self, dim: int, hidden_features: int, multiple_of: int = 128) -> None:
        super().__init__()
        hidden = -(-hidden_features // multiple_of) * multiple_of
        self.fc1 = Linear(dim, 2 * hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if _plain(self.fc1):  # the native GLU kernel adds fc1's bias (dense.linear_glu)
            return self.fc2(linear_glu(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(glu(self.fc1(x)))


class Block(nn.Module):
    """``y = x + mixer(norm1(x)[, context])``, returns ``mlp(norm2(y))`` (no residual after the MLP).

    This is what FlashPerceiver gets from flash-attn's pre-norm ``Block`` (it keeps ``hidden_states``
    and drops the returned ``residual``). The context of a cross-attention is not normalised.
    """

    def __init__(self, dim: int, mixer: CrossAttention | SelfAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = mlp
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.norm1(x)
        if isinstance(self.mixer, CrossAttention):
            h, weights = self.mixer(h, context, mask, return_weights)
        else:
            h, weights = self.mixer(h, return_weights)
        return self.mlp(self.norm2(h + x)), weights


class TokenDrop(nn.Module):
    """In training, keep a random ``int((1 - p) · N)`` of the ``N`` tokens of each sample (order random).

    Draws with ``torch.multinomial`` exactly as FlashPerceiver does, so the same seed drops the same
    latents.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"latent_drop must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, D]`` → ``[B, int((1 - p) N), D]`` in training, unchanged in eval."""
        if not self.training or self.p == 0:
            return x
        b, n = x.shape[:2]
        probs = torch.full((b, n), 1.0 / n, device=x.device)
        keep = torch.multinomial(probs, int((1 - self.p) * n), replacement=False)  # [B, kept]
        return x[torch.arange(b, device=x.device)[:, None], keep]


# ------------------------------------------------------------------------------------------- models


class PerceiverBase(nn.Module):
    """FlashPerceiver's encoder: latents cross-attend the input, then ``self_per_cross_attn`` self-attentions, ``depth`` times.

    Args (FlashPerceiver's, same defaults):
        input_dim: input features, or one per cross-attention (a list of length ``depth``).
        depth: number of (cross-attention + ``self_per_cross_attn`` self-attention) layers.
        num_latents: learned latents; ``None`` means latents must be passed to ``forward``.
        latent_dim: latent channels.
        cross_heads, cross_head_dim: cross-attention heads and their width (either may be None).
        cross_rotary_emb_dim: must be 0 (FlashPerceiver 0.2.0 refuses rotary cross-attention too).
        cross_attn_dropout: dropout on the cross-attention weights.
        latent_heads, latent_head_dim, latent_rotary_emb_dim, latent_attn_dropout: the same for
            the latent self-attention (rotary allowed).
        latent_drop: share of latents dropped in training (:class:`TokenDrop`).
        weight_tie_layers: layers 1 … depth-1 share one set of weights (layer 0 has its own).
        gated_mlp: :class:`GatedMlp` (True) or an exact-GELU MLP.
        self_per_cross_attn: self-attention blocks after each cross-attention.
        num_zero_tokens: learned tokens prepended to each input (keys that are always valid).
        use_flash_attn: recorded only (see :meth:`set_flash_attn`); attention is always SDPA here.
    """

    def __init__(
        self,
        *,
        input_dim: int | Sequence[int],
        depth: int,
        num_latents: int | None = 512,
        latent_dim: int = 512,
        cross_heads: int | None = 1,
        cross_head_dim: int | None = 64,
        cross_rotary_emb_dim: int = 0,
        cross_attn_dropout: float = 0.0,
        latent_heads: int | None = 8,
        latent_head_dim: int | None = 64,
        latent_rotary_emb_dim: int = 0,
        latent_attn_dropout: float = 0.0,
        latent_drop: float = 0.0,
        weight_tie_layers: bool = False,
        gated_mlp: bool = True,
        self_per_cross_attn: int = 1,
        num_zero_tokens: int | None = None,
        use_flash_attn: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if isinstance(input_dim, (list, tuple)):
            if len(input_dim) != depth:
                raise ValueError(f"input_dim lists one dimension per cross-attention: expected {depth} (depth), "
                                 f"got {len(input_dim)}")
            if weight_tie_layers:
                raise ValueError("weight_tie_layers=True needs a single input_dim, got a list")
            self.input_dims = list(input_dim)
        else:
            self.input_dims = [input_dim] * depth
        if cross_rotary_emb_dim:
            raise NotImplementedError(
                f"cross_rotary_emb_dim={cross_rotary_emb_dim}: rotary embeddings in cross-attention are not "
                "supported (FlashPerceiver 0.2.0 / flash-attn refuse them as well); use 0")
        if num_latents is not None and num_latents < 1:
            raise ValueError(f"num_latents must be >= 1 or None, got {num_latents}")
        if self_per_cross_attn < 0:
            raise ValueError(f"self_per_cross_attn must be >= 0, got {self_per_cross_attn}")

        self.num_latents, self.latent_dim, self.depth = num_latents, latent_dim, depth
        self.cross_heads, self.cross_head_dim = _heads(cross_heads, cross_head_dim, latent_dim, "cross-attention")
        self.latent_heads, self.latent_head_dim = _heads(latent_heads, latent_head_dim, latent_dim, "self-attention")
        self.self_per_cross_attn = self_per_cross_attn
        self.gated_mlp = gated_mlp
        self.use_flash_attn = use_flash_attn

        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim)) if num_latents is not None else None

        def cross_block(in_dim: int) -> Block:
            mixer = CrossAttention(latent_dim, in_dim, num_heads=self.cross_heads, head_dim=self.cross_head_dim,
                                   dropout=cross_attn_dropout)
            return Block(latent_dim, mixer, self._mlp(latent_dim))

        def self_block() -> Block:
            mixer = SelfAttention(latent_dim, num_heads=self.latent_heads, head_dim=self.latent_head_dim,
                                  dropout=latent_attn_dropout, rotary_dim=latent_rotary_emb_dim)
            return Block(latent_dim, mixer, self._mlp(latent_dim))

        self.layers = nn.ModuleList()
        self.zero_tokens = nn.ParameterList()
        shared: tuple[Block, list[Block]] | None = None
        for i, in_dim in enumerate(self.input_dims):
            if shared is not None:  # weight tying: layers 1 … depth-1 are one module
                cross, selfs = shared
            else:
                cross, selfs = cross_block(in_dim), [self_block() for _ in range(self_per_cross_attn)]
                if weight_tie_layers and i == 1:
                    shared = cross, selfs
            self.layers.append(nn.ModuleList([cross, nn.ModuleList(selfs)]))
            self.zero_tokens.append(nn.Parameter(torch.randn(num_zero_tokens, in_dim)) if num_zero_tokens else None)
        self.latent_drop = TokenDrop(latent_drop)

    def _mlp(self, dim: int) -> nn.Module:
        """``GatedMlp`` (hidden ``latent_dim · 4``, also for the PerceiverIO query block) or exact-GELU ``Mlp``."""
        return GatedMlp(dim, self.latent_dim * 4) if self.gated_mlp else FeedForward(dim, 4, "gelu")

    def set_flash_attn(self, use_flash_attn: bool) -> None:
        """Recorded for compatibility; attention always runs through SDPA (weights on request)."""
        self.use_flash_attn = bool(use_flash_attn)

    @property
    def num_attention_layers_per_block(self) -> int:
        return 1 + self.self_per_cross_attn

    @property
    def num_attention_layers(self) -> int:
        return self.depth * self.num_attention_layers_per_block

    @property
    def num_self_attention_layers(self) -> int:
        return self.depth * self.self_per_cross_attn

    @property
    def num_cross_attention_layers(self) -> int:
        return self.depth

    def _contexts(self, data: Inputs, mask: Masks) -> tuple[list[Tensor], list[Tensor | None]]:
        """Validated inputs → the key/value tensor and key mask of each cross-attention.

        One tensor serves every cross-attention and gets ``zero_tokens[0]`` (FlashPerceiver builds its
        context once, at the first layer); a list gives each layer its own input and zero tokens.
        """
        multi = isinstance(data, (list, tuple))
        if multi:
            if len(data) != self.depth:
                raise ValueError(f"expected {self.depth} inputs (one per cross-attention, depth={self.depth}), "
                                 f"got {len(data)}")
            if mask is None:
                mask = [None] * self.depth
            elif not isinstance(mask, (list, tuple)):
                raise TypeError("with a list of inputs, mask must be a list as well (entries may be None), "
                                f"got {type(mask).__name__}")
            elif len(mask) != self.depth:
                raise ValueError(f"expected {self.depth} masks (one per input), got {len(mask)}")
            data, masks = list(data), list(mask)
        elif isinstance(data, Tensor):
            if mask is not None and not isinstance(mask, Tensor):
                raise TypeError(f"with a single input tensor, mask must be a tensor or None, got {type(mask).__name__}")
            data, masks = [data], [mask]
        else:
            raise TypeError(f"data must be a tensor [B, N, input_dim] or a list of them, got {type(data).__name__}")

        batch = None
        contexts, key_masks = [], []
        for i, (x, m) in enumerate(zip(data, masks)):
            name = f"data[{i}]" if multi else "data"
            if not isinstance(x, Tensor) or x.ndim != 3:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} must be [batch, tokens, {self.input_dims[i]}], got {shape}")
            if x.shape[-1] != self.input_dims[i]:
                raise ValueError(f"{name} has {x.shape[-1]} features, expected input_dim {self.input_dims[i]}")
            check_tensor(x, name, layout=f"[batch, tokens, {self.input_dims[i]}]")
            check_like(x, self, name)
            batch = x.shape[0] if batch is None else batch
            if x.shape[0] != batch:
                raise ValueError(f"all inputs need the same batch size: data[0] has {batch}, {name} has {x.shape[0]}")
            m = check_mask(m, batch, x.shape[1], name.replace("data", "mask"), device=x.device)
            zero = self.zero_tokens[i]
            if zero is not None:
                x = torch.cat([repeat(zero, "n d -> b n d", b=batch).to(x.dtype), x], dim=1)
                if m is not None:
                    m = torch.cat([m.new_ones(batch, zero.shape[0]), m], dim=1)
            contexts.append(x)
            key_masks.append(m)
        return contexts * (self.depth // len(contexts)), key_masks * (self.depth // len(key_masks))

    def _latents(self, latents: Tensor | None, batch: int) -> Tensor:
        if latents is None:
            if self.latents is None:
                raise ValueError("this model was built with num_latents=None: pass latents=[N, latent_dim] "
                                 "or [batch, N, latent_dim] to forward")
            latents = self.latents
        else:
            check_like(check_tensor(latents, "latents", kind="float", ndim=(2, 3)), self, "latents")
        if latents.ndim not in (2, 3) or latents.shape[-1] != self.latent_dim:
            raise ValueError(f"latents must be [N, {self.latent_dim}] or [batch, N, {self.latent_dim}] "
                             f"(latent_dim {self.latent_dim}), got {tuple(latents.shape)}")
        if latents.ndim == 2:
            return per_sample(latents, batch)
        if latents.shape[0] != batch:
            raise ValueError(f"latents have batch size {latents.shape[0]}, the data {batch}")
        return latents

    def forward(self, data: Inputs, mask: Masks = None, latents: Tensor | None = None,
                return_attn_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode ``data [B, N, input_dim]`` (or a list, one per cross-attention) into latents ``[B, N_lat, latent_dim]``.

        Args:
            mask: boolean ``[B, N]``, True = attend (a list of them, entries may be None, for list inputs).
            latents: ``[N_lat, latent_dim]`` or ``[B, N_lat, latent_dim]`` instead of the learned ones.
            return_attn_weights: also return every attention's weights ``[B, H, N_lat, K]`` (cross-attention,
                ``K`` counting zero tokens first) and ``[B, H, N_lat, N_lat]`` (self-attention), in call order.
        """
        contexts, masks = self._contexts(data, mask)
        x = self.latent_drop(self._latents(latents, contexts[0].shape[0]))
        weights: list[Tensor] = []
        for (cross, selfs), context, m in zip(self.layers, contexts, masks):
            x, w = cross(x, context, m, return_attn_weights)
            weights += [w] if return_attn_weights else []
            for block in selfs:
                x, w = block(x, return_weights=return_attn_weights)
                weights += [w] if return_attn_weights else []
        return (x, weights) if return_attn_weights else x


def _output_mode(mode: str) -> str:
    if mode == "mean":  # the published 0.2.0 default; its forward rejects it, here it means "average"
        return "average"
    if mode not in ("average", "concat", "first"):
        raise ValueError(f"output_mode must be 'average' (alias 'mean'), 'concat' or 'first', got {mode!r}")
    return mode


@configurable
class Perceiver(PerceiverBase):
    """FlashPerceiver's ``Perceiver``: :class:`PerceiverBase` plus an optional head.

    With ``output_dim``, the latents are pooled by ``output_mode`` — ``'average'`` (default; ``'mean'``
    is accepted as an alias, see the module docs), ``'concat'`` (flattened, needs ``num_latents``) or
    ``'first'`` — then ``LayerNorm`` and ``Linear`` (``out_proj``) give ``[B, output_dim]``. Without
    it, the latents ``[B, N_lat, latent_dim]`` are returned. Other arguments as :class:`PerceiverBase`.
    """

    def __init__(self, *, input_dim: int | Sequence[int], depth: int, output_dim: int | None = None,
                 output_mode: OutputMode = "average", num_latents: int | None = 512, latent_dim: int = 512,
                 cross_heads: int | None = 1, cross_head_dim: int | None = 64, cross_rotary_emb_dim: int = 0,
                 cross_attn_dropout: float = 0.0, latent_heads: int | None = 8, latent_head_dim: int | None = 64,
                 latent_rotary_emb_dim: int = 0, latent_attn_dropout: float = 0.0, latent_drop: float = 0.0,
                 weight_tie_layers: bool = False, gated_mlp: bool = True, self_per_cross_attn: int = 1,
                 num_zero_tokens: int | None = None, use_flash_attn: bool = True) -> None:
        output_mode = _output_mode(output_mode)
        if latent_drop > 0 and output_mode == "concat":
            raise ValueError("output_mode='concat' cannot be combined with latent_drop > 0")
        super().__init__(
            input_dim=input_dim, depth=depth, num_latents=num_latents, latent_dim=latent_dim, cross_heads=cross_heads,
            cross_head_dim=cross_head_dim, cross_rotary_emb_dim=cross_rotary_emb_dim,
            cross_attn_dropout=cross_attn_dropout, latent_heads=latent_heads, latent_head_dim=latent_head_dim,
            latent_rotary_emb_dim=latent_rotary_emb_dim, latent_attn_dropout=latent_attn_dropout,
            latent_drop=latent_drop, weight_tie_layers=weight_tie_layers, gated_mlp=gated_mlp,
            self_per_cross_attn=self_per_cross_attn, num_zero_tokens=num_zero_tokens, use_flash_attn=use_flash_attn,
        )
        self.output_dim, self.output_mode = output_dim, output_mode
        if output_dim is None:
            self.out_proj = nn.Identity()
        else:
            if output_mode == "concat" and num_latents is None:
                raise ValueError("output_mode='concat' needs num_latents (the flattened width), got None")
            width = num_latents * latent_dim if output_mode == "concat" else latent_dim
            self.out_proj = nn.Sequential(nn.LayerNorm(width), Linear(width, output_dim))

    def forward(self, data: Inputs, mask: Masks = None, latents: Tensor | None = None,
                return_embeddings: bool = False,
                return_attn_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``[B, output_dim]`` (or the latents, see the class docstring; ``return_embeddings`` forces them).

        Arguments as :meth:`PerceiverBase.forward`; with ``return_attn_weights``, returns ``(out, weights)``.
        """
        out = super().forward(data, mask, latents, return_attn_weights)
        x, weights = out if return_attn_weights else (out, None)
        if not return_embeddings and self.output_dim is not None:
            if self.output_mode == "average":
                x = x.mean(1)
            elif self.output_mode == "first":
                x = x[:, 0]
            else:
                if x.shape[1] != self.num_latents:
                    raise ValueError(f"output_mode='concat' was built for {self.num_latents} latents, "
                                     f"got {x.shape[1]}")
                x = x.flatten(1)
            x = self.out_proj(x)
        return (x, weights) if return_attn_weights else x


@configurable
class PerceiverIO(PerceiverBase):
    """FlashPerceiver's ``PerceiverIO``: one cross-attention, ``depth`` self-attentions, a query decoder.

    The decoder (``query_block``) is a block of its own: queries ``[B, Q, query_dim]`` cross-attend the
    latents (``query_heads`` × ``query_head_dim``), then its MLP; with ``proj_dim``, ``LayerNorm`` and
    ``Linear`` (``out_proj``) map to ``proj_dim``. ``query_rotary_emb_dim`` must be 0. Other arguments as
    :class:`PerceiverBase` (``input_dim`` may be a list of one).
    """

    def __init__(self, *, input_dim: int | Sequence[int], query_dim: int, depth: int, proj_dim: int | None = None,
                 num_latents: int | None = 512, latent_dim: int = 512, cross_heads: int | None = 1,
                 cross_head_dim: int | None = 64, cross_rotary_emb_dim: int = 0, cross_attn_dropout: float = 0.0,
                 latent_heads: int | None = 8, latent_head_dim: int | None = 64, latent_rotary_emb_dim: int = 0,
                 latent_attn_dropout: float = 0.0, latent_drop: float = 0.0, query_heads: int | None = 1,
                 query_head_dim: int | None = 64, query_rotary_emb_dim: int = 0, query_attn_dropout: float = 0.0,
                 weight_tie_layers: bool = False, gated_mlp: bool = True, num_zero_tokens: int | None = None,
                 use_flash_attn: bool = True) -> None:
        if query_rotary_emb_dim:
            raise NotImplementedError(
                f"query_rotary_emb_dim={query_rotary_emb_dim}: rotary embeddings in the query cross-attention are not "
                "supported (FlashPerceiver 0.2.0 / flash-attn refuse them as well); use 0")
        super().__init__(
            input_dim=input_dim, depth=1, num_latents=num_latents, latent_dim=latent_dim, cross_heads=cross_heads,
            cross_head_dim=cross_head_dim, cross_rotary_emb_dim=cross_rotary_emb_dim,
            cross_attn_dropout=cross_attn_dropout, latent_heads=latent_heads, latent_head_dim=latent_head_dim,
            latent_rotary_emb_dim=latent_rotary_emb_dim, latent_attn_dropout=latent_attn_dropout,
            latent_drop=latent_drop, weight_tie_layers=weight_tie_layers, gated_mlp=gated_mlp,
            self_per_cross_attn=depth, num_zero_tokens=num_zero_tokens, use_flash_attn=use_flash_attn,
        )
        self.query_dim, self.proj_dim = query_dim, proj_dim
        self.query_heads, self.query_head_dim = _heads(query_heads, query_head_dim, query_dim, "query attention")
        mixer = CrossAttention(query_dim, latent_dim, num_heads=self.query_heads, head_dim=self.query_head_dim,
                               dropout=query_attn_dropout)
        self.query_block = Block(query_dim, mixer, self._mlp(query_dim))
        if proj_dim is None:
            self.out_proj = nn.Identity()
        else:
            self.out_proj = nn.Sequential(nn.LayerNorm(query_dim), Linear(query_dim, proj_dim))

    def forward(self, data: Inputs, mask: Masks = None, latents: Tensor | None = None, queries: Tensor | None = None,
                query_mask: Tensor | None = None,
                return_attn_weights: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Decode ``queries`` (``[Q, query_dim]`` or ``[B, Q, query_dim]``) → ``[B, Q, proj_dim or query_dim]``.

        Without queries, the latents ``[B, N_lat, latent_dim]`` are returned. ``query_mask`` is refused
        (as in FlashPerceiver). The attention weights returned are the encoder's (the decoder's are not
        included, as in FlashPerceiver). Other arguments as :meth:`PerceiverBase.forward`.
        """
        if query_mask is not None:
            raise NotImplementedError("query_mask is not supported (FlashPerceiver 0.2.0 refuses it too); "
                                      "every query is decoded independently, so drop padded queries' outputs instead")
        out = super().forward(data, mask, latents, return_attn_weights)
        x, weights = out if return_attn_weights else (out, None)
        if queries is not None:
            check_like(check_tensor(queries, "queries", kind="float", ndim=(2, 3), allow_empty=True), self, "queries")
            if queries.ndim not in (2, 3) or queries.shape[-1] != self.query_dim:
                raise ValueError(f"queries must be [Q, {self.query_dim}] or [batch, Q, {self.query_dim}] "
                                 f"(query_dim {self.query_dim}), got {tuple(queries.shape)}")
            if queries.ndim == 2:
                queries = per_sample(queries, x.shape[0])
            elif queries.shape[0] != x.shape[0]:
                raise ValueError(f"queries have batch size {queries.shape[0]}, the data {x.shape[0]}")
            x = self.out_proj(self.query_block(queries, x)[0])
        return (x, weights) if return_attn_weights else x


FlashPerceiver = Perceiver
"""Alias exported at the package top level (``perceivers.FlashPerceiver``), where ``Perceiver`` is perceiver-pytorch's."""
FlashPerceiverIO = PerceiverIO
"""Alias exported at the package top level (``perceivers.FlashPerceiverIO``)."""


# ------------------------------------------------------------------------------ positional encodings


class BasePositionalEncoding(nn.Module):
    """A positional encoder of coordinates ``[..., in_dim]`` → ``[..., out_dim]``."""

    in_dim: int
    out_dim: int

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class FourierPositionalEncoding(BasePositionalEncoding):
    """``sin(2π · x P)`` for a projection matrix ``P [in_dim, out_dim]`` (a buffer, or a parameter if trainable)."""

    def __init__(self, proj_matrix: Tensor, is_trainable: bool = False) -> None:
        super().__init__()
        if proj_matrix.ndim != 2:
            raise ValueError(f"the projection matrix must be 2-D [in_dim, out_dim], got {proj_matrix.ndim} dims")
        self.is_trainable = is_trainable
        if is_trainable:
            self.proj_matrix = nn.Parameter(proj_matrix)
        else:
            self.register_buffer("proj_matrix", proj_matrix)
        self.in_dim, self.out_dim = proj_matrix.shape

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected {self.in_dim} input channels, got {x.shape[-1]}")
        x, proj, dtype = _feature_operands(x, self.proj_matrix)
        with torch.autocast(x.device.type, enabled=False):
            return torch.sin(2 * math.pi * torch.einsum("...i,ij->...j", x, proj)).to(dtype)


class IdentityPositionalEncoding(BasePositionalEncoding):
    """Returns the coordinates themselves."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        return x


class GaussianFourierFeatureTransform(FourierPositionalEncoding):
    """Random Fourier features (Tancik et al. 2020): ``P ~ N(0, sigma²)`` of shape ``[in_dim, mapping_size]``.

    ``out_dim`` is ``mapping_size`` (sines only). ``seed`` draws ``P`` from its own generator.
    """

    def __init__(self, in_dim: int, mapping_size: int = 32, sigma: float = 1.0, is_trainable: bool = False,
                 seed: int | None = None) -> None:
        super().__init__(self.get_proj_matrix(in_dim, mapping_size, sigma, seed=seed), is_trainable=is_trainable)
        self.mapping_size, self.sigma, self.seed = mapping_size, sigma, seed

    @classmethod
    def get_proj_matrix(cls, in_dim: int, mapping_size: int, sigma: float, seed: int | None = None) -> Tensor:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.normal(mean=0, std=sigma, size=(in_dim, mapping_size), generator=generator)

    @classmethod
    def from_proj_matrix(cls, projection_matrix: Tensor) -> GaussianFourierFeatureTransform:
        in_dim, mapping_size = projection_matrix.shape
        transform = cls(in_dim, mapping_size)
        transform.proj_matrix.data = projection_matrix.clone()
        return transform


class NeRFPositionalEncoding(FourierPositionalEncoding):
    """NeRF encoding (Mildenhall et al. 2020): per input channel ``[sin(π 2^k x), cos(π 2^k x)]``, k < bands.

    ``out_dim = in_dim · 2 · num_frequency_bands``; channel order: input channel, then sin/cos, then band.
    """

    def __init__(self, in_dim: int, num_frequency_bands: int = 10) -> None:
        super().__init__((2.0 ** torch.arange(num_frequency_bands))[None, :])
        self.num_frequency_bands = num_frequency_bands
        self.in_dim, self.out_dim = in_dim, num_frequency_bands * 2 * in_dim

    def forward(self, x: Tensor) -> Tensor:
        x, proj, dtype = _feature_operands(x, self.proj_matrix)
        scaled = math.pi * (x[..., None] * proj)  # [..., in_dim, bands]
        return torch.cat([scaled.sin(), scaled.cos()], dim=-1).flatten(-2).to(dtype)


def _feature_operands(x: Tensor, proj: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """``x`` and ``proj`` in float32 at least (float64 for float64), and the dtype to return: ``x``'s.

    Sines of arguments rounded to bfloat16 or float16 (tens to thousands of radians here) are noise,
    so the features of low-precision coordinates or projections are computed in float32 and rounded once.
    """
    work = _feature_dtype(torch.promote_types(x.dtype, proj.dtype))
    return x.to(work), proj.to(work), x.dtype


def get_encoder(name: str, in_dim: int, **kwargs) -> BasePositionalEncoding:
    """``'identity'``, ``'gaussian_fourier_features'`` or ``'nerf'`` → the encoder built with ``in_dim`` and ``kwargs``."""
    encoders = {"identity": IdentityPositionalEncoding, "gaussian_fourier_features": GaussianFourierFeatureTransform,
                "nerf": NeRFPositionalEncoding}
    if name not in encoders:
        raise ValueError(f"unknown encoder {name!r}; expected one of {list(encoders)}")
    return encoders[name](in_dim, **kwargs)


# ------------------------------------------------------------------------------------ image adapter


class ImageAdapter(nn.Module):
    """Images → Perceiver inputs ``[B, h·w, embed_dim]``: optional patches, optional position features.

    Args:
        embed_dim: output channels.
        num_channels: image channels.
        pos_encoding: encoder of the ``[-1, 1]`` grid coordinates ``(row, column)`` (``in_dim`` 2),
            concatenated after the pixels; None for none.
        patch_size: ``p`` or ``(p_h, p_w)``; each patch is flattened ``(p_h, p_w, c)``. None: pixels.
        channel_first: images are ``[B, C, H, W]`` (else ``[B, H, W, C]``).

    Features go through ``LayerNorm → Linear → LayerNorm`` (``proj``).
    """

    def __init__(self, embed_dim: int, num_channels: int = 3, pos_encoding: BasePositionalEncoding | None = None,
                 patch_size: int | tuple[int, int] | None = None, channel_first: bool = True) -> None:
        super().__init__()
        if isinstance(patch_size, int):
            patch_size = (patch_size, patch_size)
        self.embed_dim, self.num_channels, self.channel_first = embed_dim, num_channels, channel_first
        self.patch_size, self.pos_encoding = patch_size, pos_encoding
        self.patch_dim = num_channels * (1 if patch_size is None else patch_size[0] * patch_size[1])
        if pos_encoding is not None:
            self.patch_dim += pos_encoding.out_dim
        self.proj = nn.Sequential(nn.LayerNorm(self.patch_dim), Linear(self.patch_dim, embed_dim),
                                  nn.LayerNorm(embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images with 4 dimensions, got {x.ndim} ({tuple(x.shape)})")
        if self.channel_first:
            x = rearrange(x, "b c h w -> b h w c")
        if x.shape[-1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got {x.shape[-1]} "
                             f"(channel_first={self.channel_first})")
        if self.patch_size is not None:
            ph, pw = self.patch_size
            if x.shape[1] % ph or x.shape[2] % pw:
                raise ValueError(f"image size {tuple(x.shape[1:3])} is not divisible by the patch size {(ph, pw)}")
            x = rearrange(x, "b (h p1) (w p2) c -> b h w (p1 p2 c)", p1=ph, p2=pw)
        if self.pos_encoding is not None:
            grid = linear_positions(x.shape[1:3], device=x.device)  # [h, w, 2]
            x = torch.cat([x, self.pos_encoding(repeat(grid, "h w c -> b h w c", b=x.shape[0])).to(x.dtype)], dim=-1)
        return rearrange(self.proj(x), "b h w c -> b (h w) c")


# ------------------------------------------------------------------------------------------ helpers


def random_mask(x: Tensor) -> Tensor:
    """A random prefix mask ``[B, N]`` for ``x [B, N, ...]``: each sample keeps 1 … N leading tokens."""
    bs, n = x.shape[:2]
    lengths = torch.randint(1, n + 1, (bs,), device=x.device)
    return torch.arange(n, device=x.device)[None, :] < lengths[:, None]


def numel(m: nn.Module, only_trainable: bool = True) -> int:
    """Number of (trainable) parameter elements of ``m``."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not only_trainable)


def meshgrid(*size: int, batch_size: int | None = None) -> Tensor:
    """``linspace(-1, 1)`` grid coordinates ``[*size, len(size)]`` (``[batch_size, ...]`` with a batch size)."""
    grid = linear_positions(size)
    return grid if batch_size is None else repeat(grid, "... -> b ...", b=batch_size)


class CosineWithWarmupLR(LambdaLR):
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``training_steps`` (``num_cycles`` 0.5)."""

    def __init__(self, optimizer: Optimizer, training_steps: int, warmup_steps: int = 0,
                 num_cycles: float = 0.5) -> None:
        def factor(step: int) -> float:
            if step < warmup_steps:
                return step / max(1, warmup_steps)
            progress = (step - warmup_steps) / max(1, training_steps - warmup_steps)
            return max(0.0, 0.5 * (1.0 + math.cos(2.0 * math.pi * num_cycles * progress)))

        super().__init__(optimizer, factor, -1)
