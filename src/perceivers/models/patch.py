"""A patch-based Perceiver with learned position embeddings (the Keras "Image classification with
Perceiver" tutorial, Salama 2021), built from :mod:`perceivers.layers`.

Images ``[B, H, W, C]`` (channels last) are cut into ``p × p`` patches, each flattened, projected to
``patch_dim`` and added to a learned position embedding. A latent array cross-attends the patches, then
a stack of self-attention blocks refines it; the cross-attention and the stack are applied
``num_iterations`` times **with the same weights**. The classifier pools the latents (mean) and runs a
two-layer GELU MLP.

Differences from the Keras code, all deliberate: attention is scaled dot-product (``1/√d`` through
SDPA) rather than Keras ``Attention(use_scale=True)``'s learned scalar; every attention has an output
projection; residuals add the un-normalised stream (standard pre-norm); the classifier's dropout sits
between its two layers (Keras drops the logits). Augmentation and normalisation live in the data pipeline
(:mod:`perceivers.data.transforms`), not inside the model.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ..configurable import configurable
from ..layers import CrossAttentionBlock, SelfAttentionBlock, TrainablePositionEncoding
from ..layers.broadcast import per_sample
from ..layers.dense import Linear
from ..validation import check_count, is_int
from .common import check_input

__all__ = ["PatchPerceiver"]


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    pair = (value, value) if is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_int(v) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


@configurable
class PatchPerceiver(nn.Module):
    """Perceiver over ``p × p`` image patches with learned position embeddings.

    Args:
        image_size: input height and width (one int for square images); fixed, because the position
            table has one row per patch.
        patch_size: patch height and width; must divide ``image_size``.
        input_channels: image channels ``C``.
        num_classes: classifier outputs.
        num_latents, latent_dim: the latent array ``[num_latents, latent_dim]``.
        patch_dim: channels of a patch embedding (the cross-attention context); default ``latent_dim``.
        cross_heads: heads of the cross-attention (Keras: 1).
        latent_heads: heads of each self-attention (Keras: 8).
        latent_dim_head: width per self-attention head; default ``latent_dim`` (Keras ``key_dim =
            projection_dim``).
        num_blocks: self-attention blocks per iteration (Keras: 4).
        num_iterations: times the shared cross-attention + self-attention stack is applied (Keras: 2).
        mlp_mult: hidden width multiplier of every feed-forward (Keras: 1).
        dropout: dropout on attention probabilities, after feed-forwards and in the classifier (Keras: 0.1 in
            the tutorial's 2021 revision; the later one: 0.2, and 0.1 on attention).
        classifier_hidden: hidden width of the classifier MLP; default ``latent_dim``.
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int] = 64,
        patch_size: int | tuple[int, int] = 2,
        input_channels: int = 3,
        num_classes: int = 100,
        num_latents: int = 256,
        latent_dim: int = 256,
        patch_dim: int | None = None,
        cross_heads: int = 1,
        latent_heads: int = 8,
        latent_dim_head: int | None = None,
        num_blocks: int = 4,
        num_iterations: int = 2,
        mlp_mult: int = 1,
        dropout: float = 0.1,
        classifier_hidden: int | None = None,
    ) -> None:
        super().__init__()
        check_count(input_channels=input_channels, num_classes=num_classes, num_latents=num_latents,
                    latent_dim=latent_dim, cross_heads=cross_heads, latent_heads=latent_heads,
                    num_iterations=num_iterations, mlp_mult=mlp_mult)
        check_count(minimum=0, num_blocks=num_blocks)
        check_count(**{k: v for k, v in (("patch_dim", patch_dim), ("latent_dim_head", latent_dim_head),
                                         ("classifier_hidden", classifier_hidden)) if v is not None})
        self.image_size = _pair(image_size, "image_size")
        self.patch_size = _pair(patch_size, "patch_size")
        for axis, (n, p) in enumerate(zip(self.image_size, self.patch_size)):
            if n % p:
                raise ValueError(
                    f"patch_size {self.patch_size} must divide image_size {self.image_size} (axis {axis}: {n} % {p} != 0)"
                )
        self.grid_shape = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_shape[0] * self.grid_shape[1]
        self.input_channels = input_channels
        self.num_iterations = num_iterations
        patch_dim = latent_dim if patch_dim is None else patch_dim
        latent_dim_head = latent_dim if latent_dim_head is None else latent_dim_head
        classifier_hidden = latent_dim if classifier_hidden is None else classifier_hidden
        patch_values = self.patch_size[0] * self.patch_size[1] * input_channels

        self.patch_proj = Linear(patch_values, patch_dim)
        self.position = TrainablePositionEncoding(self.num_patches, patch_dim)
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.cross_attn = CrossAttentionBlock(
            latent_dim, patch_dim, num_heads=cross_heads, qkv_bias=True, query_residual=True,
            mlp_mult=mlp_mult, activation="gelu", attn_dropout=dropout, ff_dropout=dropout, norm_eps=1e-6,
        )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                latent_dim, num_heads=latent_heads, qk_channels=latent_heads * latent_dim_head, qkv_bias=True,
                mlp_mult=mlp_mult, activation="gelu", attn_dropout=dropout, ff_dropout=dropout, norm_eps=1e-6,
            )
            for _ in range(num_blocks)
        )
        self.head = nn.Sequential(
            Linear(latent_dim, classifier_hidden), nn.GELU(), nn.Dropout(dropout),
            Linear(classifier_hidden, num_classes),
        )

    def patchify(self, images: Tensor) -> Tensor:
        """``[B, H, W, C]`` → ``[B, N, p_h · p_w · C]``, patches in row-major grid order."""
        check_input(images, name="images", channels=self.input_channels, axes=2, module=self)
        if tuple(images.shape[1:3]) != self.image_size:
            raise ValueError(
                f"PatchPerceiver(image_size={self.image_size}) takes images [batch, {self.image_size[0]}, "
                f"{self.image_size[1]}, {self.input_channels}] (channels last), got {tuple(images.shape)}"
            )
        ph, pw = self.patch_size
        return rearrange(images, "b (gh ph) (gw pw) c -> b (gh gw) (ph pw c)", ph=ph, pw=pw)

    def embed(self, images: Tensor) -> Tensor:
        """The cross-attention context: patch projections plus positions, ``[B, N, patch_dim]``."""
        patches = self.patchify(images)
        return self.patch_proj(patches) + self.position().to(patches.dtype)

    def forward(self, images: Tensor, return_embeddings: bool = False) -> Tensor:
        """Classify ``images [B, H, W, C]`` → logits ``[B, num_classes]`` (or latents ``[B, N, D]``)."""
        context = self.embed(images)
        kv = self.cross_attn.project_kv(context)  # the same weights every iteration: project once
        x = per_sample(self.latents.to(context.dtype), context.shape[0])  # [B, N, D]
        for _ in range(self.num_iterations):
            x = self.cross_attn(x, kv=kv)
            for block in self.blocks:
                x = block(x)
        if return_embeddings:
            return x
        return self.head(x.mean(dim=1))
