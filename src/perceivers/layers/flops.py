"""FLOP formulas for the operators perceivers runs on CPU that ``torch.utils.flop_counter`` does not know.

``FlopCounterMode`` counts an operator only if it has a formula for it. PyTorch has none for oneDNN's
linear (``mkldnn._linear_pointwise``: perceivers' float32 dense layers on AMD processors, see
:mod:`.dense`) or for SDPA's CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``), so
without these a CPU model's count missed most of its products. :func:`register` adds both (once; it
runs when :mod:`perceivers.layers` is imported), and any ``FlopCounterMode`` in the process, such as
Lightning's model summary, counts them, for perceivers' models and every other. perceivers' native
kernels are not operators: under a counter they give way to the standard ones (:func:`.dense._native_eager`),
and so does the attention on oneDNN (:func:`.onednn_attention.applies`), whose backward's products include the
scores' recomputation.

Counts are the model's FLOPs, 2 per multiply-add, as PyTorch's: a linear ``2·rows·in·out``; attention forward
``2·b·h·q·k·(d_qk + d_v)``, its backward twice that, ``2·b·h·q·k·(2·d_qk + 2·d_v)``, as for attention written
out in products: the kernel's recomputation of the scores (``2·b·h·q·k·d_qk`` more) is work of the kernel, not
of the model, so implementations with and without it count the same (keys may be broadcast over heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils import flop_counter

__all__ = ["register"]


def _pairs(query: Sequence[int], key: Sequence[int], value: Sequence[int]) -> tuple[int, int, int]:
    """(query-key pairs, query/key width, value width) of ``query [B, H, Q, D]``, ``key [..., K, D]``,
    ``value [..., K, Dv]``."""
    b, h, q, d_qk = query
    return b * h * q * key[-2], d_qk, value[-1]


def _attention_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    n, d_qk, d_v = _pairs(query, key, value)
    return 2 * n * (d_qk + d_v)


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    n, d_qk, d_v = _pairs(query, key, value)
    return 2 * n * (2 * d_qk + 2 * d_v)  # no score recomputation: see the module's docstring


def _linear(x, second, third, *args, out_shape=None, **kwargs) -> int:
    # (x, weight, bias, attr, ...) or, with a binary epilogue, (x, other, weight, bias, attr)
    weight = third if isinstance(third, (tuple, list)) and len(third) == 2 else second  # shapes: torch.Size
    rows = 1
    for d in x[:-1]:
        rows *= d
    return 2 * rows * x[-1] * weight[0]


def register() -> None:
    """Give ``FlopCounterMode`` the formulas above for the operators this PyTorch build has (idempotent)."""
    aten, mkldnn = torch.ops.aten, torch.ops.mkldnn
    for name, namespace, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", aten, _attention_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", aten, _attention_backward),
        ("_linear_pointwise", mkldnn, _linear),
    ):
        op = getattr(namespace, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)
