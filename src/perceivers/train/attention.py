"""Cross-attention weights of a trained image model, for pictures.

The layers compute attention through SDPA and never materialise the weights, so they are recomputed
here from the model's **first** cross-attention: ``softmax(q kᵀ / √d)`` with ``q = to_q(LN(latents))``
and ``k = to_k(LN(context))``, exactly the logits the layer feeds to SDPA (no mask, no dropout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from ..layers import CrossAttentionBlock

__all__ = ["CrossAttentionInputs", "cross_attention_inputs", "cross_attention_maps"]


@dataclass
class CrossAttentionInputs:
    """What the first cross-attention of a model sees: its block, the latents ``[B, N, D]``, the
    context ``[B, M, C]`` and the ``(h, w)`` grid the ``M`` context tokens came from."""

    block: CrossAttentionBlock
    latents: Tensor
    context: Tensor
    grid: tuple[int, int]


def cross_attention_inputs(model: nn.Module, images: Tensor) -> CrossAttentionInputs:
    """Find the first cross-attention of ``model`` and its inputs for ``images``.

    Supported: :class:`~perceivers.Perceiver` (``[B, H, W, C]`` pixels + Fourier features),
    :class:`~perceivers.models.patch.PatchPerceiver` (``[B, H, W, C]``, one token per patch) and the
    official image classifiers of :func:`perceivers.create_model` (``[B, C, H, W]``). Raises
    ``TypeError`` for other models.
    """
    from ..models import Perceiver
    from ..models.patch import PatchPerceiver

    if isinstance(model, Perceiver):
        if model.input_axis != 2:
            raise TypeError(f"attention maps need a 2-D image Perceiver, got input_axis={model.input_axis}")
        context = model.build_context(images)
        block = model.blocks[model.block_order[0]].cross_attn
        latents = model.latents.expand(images.shape[0], -1, -1)
        return CrossAttentionInputs(block, latents, context, tuple(images.shape[1:3]))
    if isinstance(model, PatchPerceiver):
        context = model.embed(images)
        latents = model.latents.expand(images.shape[0], -1, -1)
        return CrossAttentionInputs(model.cross_attn, latents, context, model.grid_shape)
    perceiver = getattr(model, "perceiver", None)
    encoder = getattr(perceiver, "encoder", None)
    preprocessor = getattr(perceiver, "input_preprocessor", None)
    config = getattr(model, "config", None)
    if encoder is not None and preprocessor is not None and hasattr(config, "token_grid"):
        context = preprocessor(images)[0]
        grid = tuple(config.token_grid) if images.shape[-2:] == tuple(config.image_size) else None
        if grid is None:
            s = getattr(config, "spatial_downsample", 1)
            grid = (-(-images.shape[-2] // s), -(-images.shape[-1] // s))
        latents = encoder.latents(images.shape[0])
        return CrossAttentionInputs(encoder.cross_attention, latents, context, grid)
    raise TypeError(f"no cross-attention map support for {type(model).__name__}")


@torch.no_grad()
def cross_attention_maps(model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Attention of every latent over the input grid in the first cross-attention.

    Args:
        images: a batch in the layout the model takes (normalised as in training).

    Returns:
        weights ``[B, heads, num_latents, h, w]`` (each latent's row sums to 1 over ``h × w``) and the grid.
    """
    was_training = model.training
    model.eval()
    try:
        found = cross_attention_inputs(model, images)
        attn = found.block.attn
        q = attn.to_q(found.block.norm_q(found.latents.to(found.context.dtype)))
        k = attn.to_k(found.block.norm_kv(found.context))
        q = rearrange(q, "b n (h d) -> b h n d", h=attn.num_heads)
        k = rearrange(k, "b m (h d) -> b h m d", h=attn.num_heads)
        weights = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()).mul(q.shape[-1] ** -0.5).softmax(-1)
    finally:
        model.train(was_training)
    h, w = found.grid
    if weights.shape[-1] != h * w:
        raise ValueError(f"context has {weights.shape[-1]} tokens, not the {h}×{w} grid")
    return rearrange(weights, "b heads n (h w) -> b heads n h w", h=h, w=w), found.grid
