"""Keep freed host memory in the process, so large tensors stop page-faulting on every step.

glibc's ``malloc`` serves large blocks (≥ 128 KiB, adaptively up to 32 MiB) with ``mmap`` and returns
them to the kernel on ``free``: a training step that allocates the same 16-64 MiB activations every
iteration then takes a page fault for every 4 KiB page of every one of them, every step (README
Perceiver at 64², batch 8: ≈430,000 minor faults and ≈15% of the step on a 2-core CPU). Raising
``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps those blocks in the heap for reuse, as a caching
allocator does on a GPU; the process's resident memory then stays near its peak instead of shrinking
between steps.

``perceivers fit`` calls :func:`keep_freed_memory` at start-up (``PERCEIVERS_KEEP_FREED_MEMORY=0``
opts out); ``benchmarks/run.py --keep-freed-memory`` applies it to every implementation alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from ._env import env_switch

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve blocks up to ``threshold`` bytes from the heap and never trim it (glibc only).

    Returns whether the setting took effect (``False`` off Linux/glibc, or when
    ``PERCEIVERS_KEEP_FREED_MEMORY=0``). Process-wide; call it once, before the work.
    """
    if env_switch("PERCEIVERS_KEEP_FREED_MEMORY") is False:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    value = max(1, min(int(threshold), 2**31 - 1))
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
