"""Optional native CPU kernels, compiled on first use with the system's C compiler.

The kernels are plain C (``*.c`` next to this file, sharing ``vector.h``; the bfloat16 attention kernel
uses AVX512-BF16 intrinsics where the target has them, and reports their absence), built once per processor model into
``$PERCEIVERS_CACHE`` (default ``~/.cache/perceivers/kernels``) with ``-O3 -march=native
-ffp-contract=fast`` (products and sums fused into FMA instructions, which ISO C mode would otherwise
forbid: the kernels' inner loops run 1.2-1.35x faster, and round once instead of twice), on x86 also
``-mprefer-vector-width=512`` (loops vectorised as wide as AVX-512 where the processor has it), and
called through :mod:`ctypes` (which releases the GIL, so several threads can run one each). When no
compiler is found, the build fails, or ``PERCEIVERS_NATIVE=0`` is set, :func:`load` returns ``None``
and callers keep their PyTorch path; the results are the same up to float rounding.

The GEGLU kernel (``activations.c``) and the register-tiled attention kernel (``attention.c``) are
written in vectors of the processor's width (``vector.h``'s ``vn``: 16 floats with AVX-512, 8 with
AVX2). GEGLU loads with AVX2 too (``load(..., isa="avx2")``: :func:`has_avx2`): built for Haswell and
run on an Ice Lake, ``[2048, 4096]`` forward 3-4 ms against PyTorch's AVX2 path 8 ms; built for baseline
x86-64 (SSE2) it is 3x slower than PyTorch, so not there. The attention kernel loads only with AVX-512
(``isa="avx512"``: :func:`has_avx512`): built for Haswell it took 0.73-1.05x of SDPA's time in training
and 0.93-1.19x in inference (PyTorch and MKL held to AVX2), and whole training steps showed no gain.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .._env import env_switch

__all__ = ["emulates_bf16", "enabled", "has_amx", "has_avx2", "has_avx512", "load"]

log = logging.getLogger(__name__)
_SOURCES = Path(__file__).parent
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # GCC's tuning for Intel server cores (icelake-server, sapphirerapids) vectorises loops 256 bits wide
    # even where AVX-512 exists; the grid kernel's loops run 1.2-1.35x faster 512 bits wide on Ice Lake
    # (a 1024x1024 image 0.60-0.69 -> 0.50-0.52 s). Without AVX-512 the option changes nothing.
    _FLAGS.append("-mprefer-vector-width=512")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
# load's fast path: (name, isa) -> the library as loaded with these signatures set
_ready: dict[tuple[str, str | None], tuple[ctypes.CDLL, dict]] = {}


def enabled() -> bool:
    """False when ``PERCEIVERS_NATIVE=0`` (or ``false``/``off``) turns the native kernels off."""
    return env_switch("PERCEIVERS_NATIVE") is not False


def _cache_dir() -> Path:
    root = os.environ.get("PERCEIVERS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "perceivers" / "kernels"


@functools.cache
def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the processor's vendor, model and instruction-set flags.

    Builds are keyed by it, so a cache shared between machines (a network home directory, a container
    image built elsewhere) never hands one processor a library compiled for another's instructions.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            first = info.read().split("\n\n", 1)[0]  # the first processor's block
    except OSError:
        return platform.processor()
    keys = ("vendor_id", "cpu family", "model", "model name", "flags", "CPU implementer", "CPU part", "Features")
    return "\n".join(line for line in first.splitlines() if line.split(":", 1)[0].strip() in keys)


def _cpu_flags() -> frozenset[str]:
    """The processor's instruction-set flags (``/proc/cpuinfo``'s ``flags``; empty where there is none)."""
    return _flags_of(_cpu_identity())


@functools.lru_cache(maxsize=8)
def _flags_of(identity: str) -> frozenset[str]:
    """The ``flags`` of an identity (:func:`_cpu_identity`), parsed once: asked on every bfloat16 product
    (:func:`emulates_bf16`), parsing took 10 µs of a 75 µs ``[256, 128] × [128, 256]`` layer."""
    for line in identity.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


@functools.cache
def has_avx512() -> bool:
    """Whether the processor has AVX-512 (``avx512f`` among its flags in ``/proc/cpuinfo``; False where
    there is no such file)."""
    return "avx512f" in _cpu_flags()


@functools.cache
def has_avx2() -> bool:
    """Whether the processor has AVX2 with FMA (``avx2`` and ``fma`` among its flags), as every one with
    AVX-512 does."""
    return {"avx2", "fma"} <= _cpu_flags()


@functools.cache
def has_amx() -> bool:
    """Whether the processor has AMX tiles with bfloat16 products (``amx_bf16`` among its flags: Sapphire Rapids
    and later Xeons). oneDNN runs bfloat16 products there at 5-7x its float32 rate, far beyond the AVX512-BF16
    dot products of perceivers' own bfloat16 attention kernel."""
    return "amx_bf16" in _cpu_flags()


def emulates_bf16() -> bool:
    """Whether this is an x86 processor without bfloat16 arithmetic (neither ``avx512_bf16`` nor ``amx_bf16``
    among its flags). There PyTorch and oneDNN emulate bfloat16 products with float32 arithmetic and
    conversions, at about a quarter of the float32 rate on an Ice Lake, so perceivers computes its bfloat16
    products in float32 instead (:func:`perceivers.layers.dense.bf16_in_float32`). False where the flags are
    unknown (other architectures)."""
    flags = _cpu_flags()  # asked on every bfloat16 product: membership tests, no set built
    return bool(flags) and "avx512_bf16" not in flags and "amx_bf16" not in flags


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` split into words (``CC="ccache gcc"``), else ``cc``, ``gcc`` or ``clang``."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


def _build(name: str) -> Path | None:
    source = _SOURCES / f"{name}.c"
    compiler = _compiler()
    if compiler is None:
        log.info("perceivers: no C compiler found; native kernel %s not built", name)
        return None
    headers = b"".join(path.read_bytes() for path in sorted(_SOURCES.glob("*.h")))  # what the sources include
    key = hashlib.sha256(
        source.read_bytes() + headers + " ".join([*compiler, *_FLAGS, platform.machine(), _cpu_identity()]).encode()
    ).hexdigest()[:16]
    tmp = None
    try:
        target = _cache_dir() / f"{name}-{key}.so"  # Path.home() raises RuntimeError without a home directory
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        subprocess.run([*compiler, *_FLAGS, str(source), "-o", tmp, "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.chmod(tmp, 0o755)  # mkstemp's 0600: other users sharing the cache could not load it
        os.replace(tmp, target)  # atomic: concurrent builders each write their own file
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # no compiler/home/writable cache, build error
        detail = getattr(err, "stderr", b"") or b""
        log.warning("perceivers: building native kernel %s failed, using the PyTorch path instead: %s %s", name, err,
                    detail.decode(errors="replace"))
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None
    return target


def load(name: str, signatures: dict[str, tuple[list, type | None]] | None = None, *,
         isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled library for ``name`` (e.g. ``"grid_attention"``), or ``None`` if unavailable, or
    where the processor lacks the instructions ``isa`` names: ``"avx512"`` (:func:`has_avx512`) or
    ``"avx2"`` (:func:`has_avx2`).

    ``signatures`` maps its functions to ``(argtypes, restype)``, set on them unless already set.
    """
    if isa not in (None, "avx2", "avx512"):
        raise ValueError(f"isa must be None, 'avx2' or 'avx512', got {isa!r}")
    if not enabled() or (isa == "avx512" and not has_avx512()) or (isa == "avx2" and not has_avx2()):
        return None
    ready = _ready.get((name, isa))
    if ready is not None and ready[1] is signatures and _loaded.get(name) is ready[0]:
        return ready[0]  # loaded and these signatures set: the usual call, on every use of a kernel (13 -> 1 µs)
    with _lock:
        if name not in _loaded:
            path = _build(name)
            try:
                _loaded[name] = ctypes.CDLL(str(path)) if path is not None else None
            except OSError as err:
                log.info("perceivers: loading native kernel %s failed: %s", name, err)
                _loaded[name] = None
        lib = _loaded[name]
        for function, (argtypes, restype) in (signatures or {}).items() if lib is not None else ():
            if getattr(lib, function).argtypes is None:  # the first caller that names them
                getattr(lib, function).argtypes, getattr(lib, function).restype = argtypes, restype
        if lib is not None and signatures is not None:
            _ready[(name, isa)] = (lib, signatures)
        return lib
