"""DeepMind's Perceiver IO encoder: one cross-attention into learned latents, then shared self-attention."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ..configurable import configurable
from ..layers import (
    Activation,
    ContextStream,
    CrossAttentionBlock,
    SelfAttentionBlock,
    TrainablePositionEncoding,
    check_mask,
)
from ..layers.blocks import default_qk_channels

__all__ = ["PerceiverEncoder"]


@configurable
class PerceiverEncoder(nn.Module):
    """Latents ``[N, D]`` cross-attend the inputs ``[B, M, C]`` once, then ``num_blocks`` passes of one stack.

    The stack holds ``num_self_attends_per_block`` self-attention layers whose weights are shared by
    all blocks (ImageNet: 6 layers applied 8 times). All attention uses tanh-GELU MLPs, LayerNorm eps
    1e-5 and biased q/k/v projections, as the official code.

    Args:
        input_channels: C, channels of the preprocessed inputs.
        num_latents, latent_channels: N and D of the latent array (truncated-normal init, std
            ``latent_init_scale``).
        num_blocks: how many times the self-attention stack is applied.
        num_self_attends_per_block: layers in the stack.
        num_cross_attention_heads, num_self_attention_heads: heads.
        qk_channels, v_channels: widths of q/k and v in *both* attentions; by default the
            cross-attention uses the width selected by ``cross_attention_shape_for_attn`` ("kv": C,
            "q": D) and the self-attention uses D.
        cross_attention_widening_factor, self_attention_widening_factor: MLP hidden = factor × width.
        use_query_residual: add the latents to the cross-attention output.
        dropout: attention-probability and MLP dropout (training only).
        activation: MLP activation; ``"gelu_tanh"`` is the official one (transformers uses ``"gelu"``).
    """

    def __init__(
        self,
        input_channels: int,
        *,
        num_latents: int,
        latent_channels: int,
        num_blocks: int = 1,
        num_self_attends_per_block: int = 6,
        num_cross_attention_heads: int = 1,
        num_self_attention_heads: int = 8,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        cross_attention_widening_factor: int = 1,
        self_attention_widening_factor: int = 1,
        use_query_residual: bool = True,
        cross_attention_shape_for_attn: Literal["kv", "q"] = "kv",
        dropout: float = 0.0,
        latent_init_scale: float = 0.02,
        activation: Activation = "gelu_tanh",
    ) -> None:
        super().__init__()
        if num_blocks < 1 or num_self_attends_per_block < 1:
            raise ValueError(
                f"num_blocks and num_self_attends_per_block must be >= 1, got {num_blocks} and "
                f"{num_self_attends_per_block}"
            )
        self.input_channels = input_channels
        self.num_latents, self.latent_channels = num_latents, latent_channels
        self.num_blocks = num_blocks
        self.latents = TrainablePositionEncoding(num_latents, latent_channels, latent_init_scale)
        cross_qk = default_qk_channels(cross_attention_shape_for_attn, q_channels=latent_channels,
                                       kv_channels=input_channels)  # checks the setting even where unused
        self.cross_attention = CrossAttentionBlock(
            latent_channels, input_channels, num_heads=num_cross_attention_heads,
            qk_channels=cross_qk if qk_channels is None else qk_channels, v_channels=v_channels,
            out_dim=latent_channels, qkv_bias=True, query_residual=use_query_residual,
            mlp_mult=cross_attention_widening_factor, activation=activation,
            attn_dropout=dropout, ff_dropout=dropout,
        )
        self.self_attends = nn.ModuleList(
            SelfAttentionBlock(
                latent_channels, num_heads=num_self_attention_heads, qk_channels=qk_channels,
                v_channels=v_channels, qkv_bias=True, mlp_mult=self_attention_widening_factor,
                activation=activation, attn_dropout=dropout, ff_dropout=dropout,
            )
            for _ in range(num_self_attends_per_block)
        )

    def forward(
        self,
        inputs: Tensor | ContextStream,
        *,
        mask: Tensor | None = None,
        hidden_states: list[Tensor] | None = None,
    ) -> Tensor:
        """``inputs [B, M, C]``, optional ``mask [B, M]`` (bool, True = real input) → latents ``[B, N, D]``.

        ``inputs`` may be a :class:`~perceivers.layers.ContextStream` (a preprocessor's streamed
        tokens): the cross-attention then attends it chunk by chunk. A ``hidden_states`` list receives
        the latents ``[B, N, D]`` in transformers' order: before every self-attention layer and after
        every block (``num_blocks · (num_self_attends_per_block + 1)`` tensors).
        """
        streamed = isinstance(inputs, ContextStream)
        if (not streamed and inputs.ndim != 3) or inputs.shape[-1] != self.input_channels:
            raise ValueError(
                f"encoder inputs must be [batch, tokens, {self.input_channels}], got {tuple(inputs.shape)}"
            )
        batch, length = inputs.shape[:2]
        mask = check_mask(mask, batch, length, "input_mask", device=inputs.device)
        dtype = self.latents.embeddings.dtype if inputs.dtype is None else inputs.dtype  # (a stream may not say)
        latents = self.latents(batch).to(dtype)  # [B, N, D]
        z = self.cross_attention(latents, inputs, mask=mask)
        for _ in range(self.num_blocks):
            for layer in self.self_attends:
                if hidden_states is not None:
                    hidden_states.append(z)
                z = layer(z)
            if hidden_states is not None:
                hidden_states.append(z)
        return z
