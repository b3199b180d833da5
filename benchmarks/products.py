#!/usr/bin/env python
"""How far a training step is from the matmul rate: its matrix products, each timed alone.

    python benchmarks/products.py readme-64-untied vision-fourier-official [--impl perceivers]

Records every matrix product of one training step (dense layers on oneDNN or MKL, ``mm``/``addmm``/``bmm``,
attention's products where they are separate calls) with its shapes and strides, then times each alone on
random operands of the same layout, hot in cache. Their sum is what the step would take if nothing
but its products ran, each at its isolated speed: the products' rate bounds the step's *% of matmul*
from above, and their share of the step is what the rest (elementwise work, normalisation, the
optimizer, products running cache-cold in the step) costs. SDPA's fused kernels are not separate
products and count as "the rest".
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure
import run as R
import torch
import workloads as W
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCTS = {"_linear_pointwise", "mm", "addmm", "bmm"}


class _Recorder(TorchDispatchMode):
    """Counts the product calls by (operator, operand shapes and strides, other arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in PRODUCTS:
            self.calls[(func, tuple(_spec(a) for a in args))] += 1
        return func(*args, **(kwargs or {}))


def _spec(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), a.stride(), a.dtype)
    return ("list", tuple(a)) if isinstance(a, list) else ("value", a)


def _operand(spec):
    kind, *rest = spec
    if kind == "tensor":
        shape, stride, dtype = rest
        size = sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if all(shape) else 0
        return torch.randn(size, dtype=dtype).as_strided(shape, stride)
    return list(rest[0]) if kind == "list" else rest[0]


def _flops(func, specs) -> int:
    """2 per multiply-add: ``x [..., k] · w`` with ``w [n, k]`` (linear) or ``[..., k, n]`` (mm/bmm)."""
    tensors = [s[1] for s in specs if s[0] == "tensor"]
    if func.overloadpacket.__name__ == "addmm":
        tensors = tensors[1:]
    x, w = tensors[0], tensors[1]
    n = w[0] if func.overloadpacket.__name__ == "_linear_pointwise" else w[-1]
    return 2 * math.prod(x) * n


def products_of_step(step, repeats: int = 5) -> dict:
    """Run ``step`` once under the recorder, then time each distinct product alone (best of ``repeats``)."""
    recorder = _Recorder()
    with recorder:
        step()
    total_s = total_flop = 0.0
    for (func, specs), count in recorder.calls.items():
        args = [_operand(s) for s in specs]
        func(*args)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            func(*args)
            best = min(best, time.perf_counter() - t0)
        total_s += best * count
        total_flop += _flops(func, specs) * count
    return {"distinct": len(recorder.calls), "calls": sum(recorder.calls.values()), "flop": total_flop,
            "isolated_s": total_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workloads", nargs="+", help="workload names (benchmarks/run.py --list)")
    p.add_argument("--impl", default="perceivers")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (best) and timed calls per product")
    args = p.parse_args()
    device = torch.device("cpu")
    rates = measure.matmul_rates(device)
    peak = max(rates.values())
    print("reference matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    workloads = {w.name: w for w in W.all_workloads()}
    for name in args.workloads:
        wl = workloads[name]
        step = R.make_step(wl.build(args.impl, device), wl.inputs(wl.batch, device), device, "fp32")
        step()
        res = products_of_step(step, args.repeats)
        best = math.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
        rate = res["flop"] / res["isolated_s"]
        print(f"{name} ({args.impl}): {res['calls']} products ({res['distinct']} distinct), "
              f"{res['flop'] / 1e9:.1f} GFLOP, alone {res['isolated_s']:.3f} s = {rate / 1e9:.0f} GFLOP/s "
              f"({rate / peak:.0%} of the reference); step {best:.3f} s, products' share {res['isolated_s'] / best:.0%}")


if __name__ == "__main__":
    main()
