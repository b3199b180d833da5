"""Measurement primitives: alternating timers, peak memory of one process, FLOP counts, matmul rate.

Everything here is independent of the models: a *case* is a zero-argument callable that runs one
forward (or one training step) and returns nothing.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import flop_counter

from perceivers.layers import use_onednn
from perceivers.layers.flops import register as register_flop_formulas

__all__ = [
    "PeakMemory",
    "alternate",
    "count_flops",
    "cpu_id",
    "machine_description",
    "matmul_rate",
    "synchronize",
]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ timing


def alternate(
    cases: dict[str, Callable[[], None]],
    device: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
    min_time_s: float = 0.0,
    max_repeats: int = 30,
) -> dict[str, list[float]]:
    """Time every case at least ``repeats`` times, interleaved: each round runs every case once, in a fresh order
    (shuffled with a fixed seed).

    Interleaving spreads the load of a shared machine over all implementations alike, so that the
    ratios between them stay meaningful when the absolute times drift. The order changes from round to round
    because a fixed cycle (a rotation of one order) makes every case follow the same one every time, e.g. the
    first implementation always right after the matmul job, whose state it would inherit. Returns seconds per
    call.
    Rounds go on past ``repeats`` while less than ``min_time_s`` has passed (fast cases get more
    samples, up to ``max_repeats``); ``budget_s`` stops after the round in which the total time passed
    the budget (≥ 1 round).
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
        synchronize(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    shuffle = random.Random(0).shuffle
    for r in range(max(repeats, max_repeats)):
        if r >= repeats and time.perf_counter() - start >= min_time_s:
            break
        order = list(names)
        shuffle(order)
        for name in order:
            synchronize(device)
            t0 = time.perf_counter()
            cases[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


# ------------------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of this process above a baseline taken at construction.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the start. CPU: the
    process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` when Linux allows
    it) above the resident set at the start; without that, ``ru_maxrss`` above the start, which is
    only meaningful in a fresh process whose earlier peak was lower (each case runs in its own).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.reset_ok = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = _status_kib("VmHWM") is not None
        except OSError:
            pass
        rss = _status_kib("VmRSS")
        if self.reset_ok and rss is not None:
            self.base = rss * 1024
            self.method = "VmHWM (reset) - VmRSS"
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.reset_ok:
            return (_status_kib("VmHWM") or 0) * 1024 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


# ------------------------------------------------------------------------------------------ FLOPs


def count_flops(fn: Callable[[], None]) -> int:
    """The model FLOPs (2 per multiply-add) of the matrix products and attention in ``fn``.

    Counted with perceivers' oneDNN paths off: its attention on oneDNN recomputes the probabilities in the backward
    through counted products, where SDPA's formula (:mod:`perceivers.layers.flops`) counts the model's backward,
    twice the forward, as the peers' written-out attention; dense layers count the same either way.
    """
    register_flop_formulas()
    with use_onednn(False), flop_counter.FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ machine


def reference_size(device: torch.device) -> int:
    """Side of the square products that measure a device's matmul rate: 2048 on CPU, 8192 on a GPU."""
    return 2048 if device.type == "cpu" else 8192


def _products(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """The dense products a reference can use: PyTorch's (its BLAS) and, for float32 on CPU, oneDNN's.

    PyTorch's float32 CPU matmul is MKL, which runs AVX2 kernels on AMD processors; oneDNN, in the same
    wheel, uses AVX-512 there and is 2-2.3x faster (perceivers' dense layers use it where it is,
    ``perceivers.layers.linear``). The machine's rate is the faster of the two, so no implementation is
    measured against a slow reference.
    """
    cases = {"torch.matmul": lambda a, b: a @ b}
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        cases["oneDNN"] = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return cases


def _best_rate(product: Callable[[Tensor, Tensor], Tensor], device: torch.device, dtype: torch.dtype, n: int,
               seconds: float) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        product(a, b)
    synchronize(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    reps = 4 if device.type == "cpu" else 20
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            product(a, b)
        synchronize(device)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 * reps / dt)
        if time.perf_counter() > deadline:
            return best


def matmul_rates(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                 seconds: float = 2.0) -> dict[str, float]:
    """Measured dense matmul FLOP/s of each available product for ``n × n`` operands (best of several batches).

    ``n`` defaults to 2048 on CPU and 8192 on a GPU (which needs a large product to approach its peak).
    """
    n = n or reference_size(device)
    return {name: _best_rate(fn, device, dtype, n, seconds) for name, fn in _products(device, dtype).items()}


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                seconds: float = 2.0) -> float:
    """The machine's dense matmul FLOP/s: the fastest product of :func:`matmul_rates`."""
    return max(matmul_rates(device, dtype, n, seconds).values())


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of ``path`` (``{}`` where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


# AMD families/models → core generation (x86 family 0x19 is Zen 3 and Zen 4, 0x1a Zen 5). The generation
# sets the float32 peak per core and cycle: Zen 4 runs a 512-bit FMA as two 256-bit halves (32 FLOP/cycle),
# Zen 5 has full-width 512-bit FMA units (64 FLOP/cycle), so the same "AMD EPYC" can differ twofold.
_AMD_CORES = ((25, range(0x10), "Zen 3"), (25, range(0x20, 0x60), "Zen 3"), (25, range(0x10, 0x20), "Zen 4"),
              (25, range(0x60, 0xB0), "Zen 4"), (26, range(0x100), "Zen 5"))
# Intel server cores (family 6) by model: "Intel(R) Xeon(R) Processor" names none of them. Skylake,
# Cascade Lake and Cooper Lake share model 0x55. Most Xeon Gold and Platinum parts of these run two 512-bit
# FMAs per cycle, some Silver and Bronze parts one.
_INTEL_CORES = {0x55: "Skylake/Cascade Lake", 0x6A: "Ice Lake", 0x6C: "Ice Lake", 0x8F: "Sapphire Rapids",
                0xCF: "Emerald Rapids", 0xAD: "Granite Rapids", 0xAE: "Granite Rapids"}


def cpu_id(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU's vendor, family, model and stepping from ``cpuinfo``, its AMD or Intel server core generation where known,
    and whether it has AVX-512, AVX512-BF16 and AMX (which set the kernels and products a run can use)."""
    fields = _cpuinfo(cpuinfo)
    if not fields:
        return {}
    ident: dict = {"vendor": fields.get("vendor_id")}
    for key in ("cpu family", "model", "stepping"):
        if fields.get(key, "").isdigit():
            ident[key.replace("cpu ", "")] = int(fields[key])
    if ident["vendor"] == "AuthenticAMD":
        ident["core"] = next((name for fam, models, name in _AMD_CORES
                              if ident.get("family") == fam and ident.get("model") in models), None)
    elif ident["vendor"] == "GenuineIntel" and ident.get("family") == 6:
        ident["core"] = _INTEL_CORES.get(ident.get("model"))
    flags = set(fields.get("flags", "").split())
    ident["isa"] = [name for name in ("avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    return ident


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git(folder: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False, cwd=folder)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def perceivers_source() -> dict:
    """The perceivers that runs: its version, where it is imported from, and the git commit of that checkout
    (``-dirty`` with uncommitted changes to tracked files; None outside a git checkout)."""
    import perceivers

    path = Path(perceivers.__file__).resolve().parent
    commit = _git(path, "rev-parse", "--short", "HEAD")
    if commit and _git(path, "status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"perceivers_commit": commit or None, "perceivers_version": getattr(perceivers, "__version__", None),
            "perceivers_file": str(path)}


def machine_description(device: torch.device) -> dict:
    desc = {
        "cpu": _cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(_mem_total_gib() or 0.0, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": _loadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        desc["gpu"] = props.name
        desc["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        desc["cuda"] = torch.version.cuda
    desc.update(perceivers_source())
    return desc


# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s: the denominator of model FLOP
# utilisation on CUDA. fp32 runs use TF32 tensor cores there (run.py allows TF32). Checked in order: the
# first name fragment found in the device name wins, so the PCIe/NVL parts come before the generic SXM entry.
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.4, "fp32": 494.7}),
    ("H200", {"bf16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.05, "fp32": 183.0}),
    ("L4", {"bf16": 121.0, "fp32": 60.0}),
)


def gpu_peak_flop_per_s(name: str, precision: str) -> float | None:
    """The data-sheet dense peak (FLOP/s) of a GPU named ``name`` at ``precision``, or None if unknown."""
    for fragment, peaks in GPU_PEAK_TFLOPS:
        if fragment in name:
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def matmul_case(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                reps: int | None = None, product: str | None = None) -> tuple[Callable[[], None], int]:
    """A dense-matmul job to time interleaved with the models: ``(fn, flops per call)``.

    ``product`` names one of :func:`matmul_rates`' products (the run's fastest, measured at its start);
    without it the fastest is chosen by measuring them here.
    """
    n = n or reference_size(device)
    reps = reps or (4 if device.type == "cpu" else 20)
    products = _products(device, dtype)
    if product not in products:
        rates = matmul_rates(device, dtype, n) if len(products) > 1 else dict.fromkeys(products, 1.0)
        product = max(rates, key=rates.get)
    fn_product = products[product]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def fn() -> None:
        for _ in range(reps):
            fn_product(a, b)

    return fn, 2 * n**3 * reps
