"""Pieces shared by the task builders: the trunk (encoder) config and its encoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..io import PerceiverEncoder

__all__ = ["TrunkConfig", "as_pair", "as_tuple", "build_encoder", "check_d_model"]


def as_tuple(value: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """JSON lists → tuples (configs round-trip through JSON)."""
    return None if value is None else tuple(int(v) for v in value)


def as_pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``224`` → ``(224, 224)``; ``(H, W)`` unchanged."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"expected an int or (height, width), got {value!r}")
    return pair


@dataclass
class TrunkConfig:
    """Encoder fields shared by every task (names as transformers' ``PerceiverConfig``).

    Attributes:
        num_latents, d_latents: the latent array ``[num_latents, d_latents]``.
        num_blocks: applications of the shared self-attention stack.
        num_self_attends_per_block: self-attention layers in the stack.
        num_self_attention_heads, num_cross_attention_heads: encoder heads.
        qk_channels, v_channels: q/k and v widths of the encoder attentions (``None``: DeepMind defaults).
        cross_attention_widening_factor, self_attention_widening_factor: MLP widening.
        cross_attention_shape_for_attention: default cross-attention q/k width from ``"kv"`` or ``"q"``.
        use_query_residual: latent residual around the encoder cross-attention.
        dropout: attention and MLP dropout (0 in every official model).
        hidden_act: MLP activation of encoder and decoder: ``"gelu_tanh"`` (official, ``jax.nn.gelu``)
            or ``"gelu"`` (exact erf, what transformers' port computes).
    """

    num_latents: int = 256
    d_latents: int = 1280
    num_blocks: int = 1
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_attention_widening_factor: int = 1
    self_attention_widening_factor: int = 1
    cross_attention_shape_for_attention: str = "kv"
    use_query_residual: bool = True
    dropout: float = 0.0
    hidden_act: str = "gelu_tanh"


def check_d_model(d_model: int | None, channels: int) -> None:
    """transformers' configs carry the preprocessed width as ``d_model``; it must agree with ours."""
    if d_model is not None and d_model != channels:
        raise ValueError(f"d_model={d_model} does not match the preprocessor's output width {channels}")


def build_encoder(cfg: TrunkConfig, input_channels: int) -> PerceiverEncoder:
    """The :class:`~perceivers.io.PerceiverEncoder` described by ``cfg``."""
    return PerceiverEncoder(
        input_channels,
        num_latents=cfg.num_latents,
        latent_channels=cfg.d_latents,
        num_blocks=cfg.num_blocks,
        num_self_attends_per_block=cfg.num_self_attends_per_block,
        num_cross_attention_heads=cfg.num_cross_attention_heads,
        num_self_attention_heads=cfg.num_self_attention_heads,
        qk_channels=cfg.qk_channels,
        v_channels=cfg.v_channels,
        cross_attention_widening_factor=cfg.cross_attention_widening_factor,
        self_attention_widening_factor=cfg.self_attention_widening_factor,
        use_query_residual=cfg.use_query_residual,
        cross_attention_shape_for_attn=cfg.cross_attention_shape_for_attention,
        dropout=cfg.dropout,
        activation=cfg.hidden_act,
    )


