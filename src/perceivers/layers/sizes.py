"""``min`` and ``max`` of sizes that may be symbolic (``torch.export``, ``torch.compile(dynamic=True)``).

``torch.sym_max`` keeps a symbolic size symbolic where the builtin would specialise it, but Dynamo in torch 2.11
cannot trace it on two plain ints ("torch.* op returned non-Tensor"; 2.13 can), and every static size is one. These
take the builtin for plain ints, which Dynamo also traces symbolically for the sizes it tracks.
"""

from __future__ import annotations

import torch


def sym_max(a: int, b: int) -> int:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return torch.sym_max(a, b)
    return max(a, b)


def sym_min(a: int, b: int) -> int:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return torch.sym_min(a, b)
    return min(a, b)
