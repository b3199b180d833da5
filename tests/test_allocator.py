"""Keeping freed host memory: a large tensor allocated again and again stops page-faulting."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")

_PROBE = """
import resource, sys, torch
from perceivers.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.ones(16, 1 << 20)  # 64 MiB: above glibc's largest adaptive mmap threshold
def churn():
    for _ in range(10):
        y = x * 2.0  # a fresh 64 MiB block each time
        del y
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def _faults_per_allocation(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_blocks_are_reused_instead_of_faulted_in():
    applied, kept = _faults_per_allocation("keep")
    if not applied:
        pytest.skip("not glibc")
    _, plain = _faults_per_allocation("plain")
    assert plain > 10_000  # every 4 KiB page of the 64 MiB block, every time
    assert kept < plain / 20


def test_environment_opt_out():
    applied, _ = _faults_per_allocation("keep", PERCEIVERS_KEEP_FREED_MEMORY="0")
    assert not applied
