"""Fixtures: small datasets written in the real on-disk formats (see train_files.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch  # noqa: F401 - its log handler takes the session's stderr, not a test's capsys stream
import pytest
from train_files import write_cifar10, write_cifar100, write_image_folder


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path)


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    return write_cifar100(tmp_path)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    (folder / "b.txt").write_text("Perceivers attend to bytes: héllo wörld — ünïcode ✓\n" * 4, encoding="utf-8")
    return folder
