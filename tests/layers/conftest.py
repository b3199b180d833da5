"""Fixtures shared by the layer tests."""

import contextlib
import platform

import pytest
import torch

from perceivers import kernels


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A machine without a C compiler: an empty kernel cache, ``CC`` pointing nowhere, nothing loaded."""
    monkeypatch.setenv("PERCEIVERS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_loaded", {})


@pytest.fixture
def built_for(monkeypatch, tmp_path):
    """``built_for(march)``: the native kernels rebuilt for another x86 target (``"haswell"``: AVX2 with
    FMA; ``"x86-64"``: SSE2) into an empty cache, and loaded as if this processor had AVX-512, so the
    widths of ``vector.h`` that this machine's own build does not take are tested on it (it must run
    their instructions: skipped unless it has AVX2)."""
    if not (platform.machine().lower() in ("x86_64", "amd64") and kernels.has_avx2() and kernels._compiler()):
        pytest.skip("needs an x86 processor with AVX2 and a C compiler")

    def build(march: str) -> None:
        monkeypatch.setenv("PERCEIVERS_CACHE", str(tmp_path / march))
        monkeypatch.setattr(kernels, "_FLAGS", [*kernels._FLAGS, f"-march={march}", "-Wno-psabi"])
        monkeypatch.setattr(kernels, "_loaded", {})
        monkeypatch.setattr(kernels, "has_avx512", lambda: True)

    return build


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def default_dtype():
    """A context manager: ``torch.set_default_dtype(dtype)`` for its block (as Lightning's bf16-true
    training sets bfloat16), the previous default restored after."""
    return _default_dtype
