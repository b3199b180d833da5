"""Fixtures shared by the layer tests."""

import pytest

from perceivers import kernels


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A machine without a C compiler: an empty kernel cache, ``CC`` pointing nowhere, nothing loaded."""
    monkeypatch.setenv("PERCEIVERS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_loaded", {})
