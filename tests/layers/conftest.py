"""Fixtures shared by the layer tests."""

import contextlib

import pytest
import torch

from perceivers import kernels


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A machine without a C compiler: an empty kernel cache, ``CC`` pointing nowhere, nothing loaded."""
    monkeypatch.setenv("PERCEIVERS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_loaded", {})


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
