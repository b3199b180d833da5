"""Modality-agnostic building blocks: attention, MLPs, pre-norm blocks, position encodings."""

from .attention import Attention, KeyValue, check_mask, fold_is_cheaper, fused_export, native_export
from .blocks import CrossAttentionBlock, SelfAttentionBlock
from .dense import Linear, linear, onednn_bf16_enabled, onednn_enabled, use_onednn
from .flops import register as _register_flop_formulas
from .mlp import Activation, FeedForward
from .position import (
    FourierPositionEncoding,
    TrainablePositionEncoding,
    band_frequencies,
    fourier_features,
    linear_positions,
)
from .rotary import RotaryEmbedding as RotaryEmbedding  # re-exported (one line: __all__ is shared)
from .stream import (
    ContextStream,
    GridContext,
    auto_chunk_size,
    check_chunk_size,
    chunk_bounds,
    join_chunks,
    loop_chunk_size,
    loop_pays,
    loop_rows,
    loops,
    onnx_export,
    onnx_loops,
)

__all__ = [
    "Activation",
    "Attention",
    "ContextStream",
    "CrossAttentionBlock",
    "FeedForward",
    "FourierPositionEncoding",
    "GridContext",
    "KeyValue",
    "Linear",
    "SelfAttentionBlock",
    "TrainablePositionEncoding",
    "auto_chunk_size",
    "band_frequencies",
    "check_chunk_size",
    "check_mask",
    "chunk_bounds",
    "fold_is_cheaper",
    "fourier_features",
    "fused_export",
    "join_chunks",
    "linear",
    "linear_positions",
    "loop_chunk_size",
    "loop_pays",
    "loop_rows",
    "loops",
    "native_export",
    "onednn_bf16_enabled",
    "onednn_enabled",
    "onnx_export",
    "onnx_loops",
    "use_onednn",
]

_register_flop_formulas()  # FlopCounterMode then counts oneDNN's linear and SDPA's CPU kernel (flops.py)
