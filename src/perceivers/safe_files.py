"""Crash-safe writing and checked reading of the files perceivers saves and loads.

* :func:`atomic_path` — write to a temporary file next to the target, ``fsync`` it, then
  ``os.replace`` it over the target: a crash or a full disk mid-write leaves the previous file intact
  (never a half-written one under the real name).
* :func:`tensor_digest` — a SHA-256 over names, dtypes, shapes and bytes of a state dict, stored in
  our safetensors metadata so that flipped bytes in the payload are detected on load (safetensors
  itself has no checksum).
* :func:`read_json` — JSON files with errors that name the file.
* :func:`load_numpy_pickle` — pickles of plain containers and numpy arrays (e.g. the CIFAR files),
  unpickled without importing or calling anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = ["UnsafePickleError", "atomic_path", "atomic_write_text", "load_numpy_pickle", "read_json", "tensor_digest"]


_HOST = re.sub(r"\W", "_", socket.gethostname(), flags=re.ASCII) or "host"
_TEMP_NAME = re.compile(r"\.tmp-(?P<host>\w+)-(?P<pid>\d+)$", flags=re.ASCII)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write instead of ``path``; it replaces ``path`` only if the block succeeds.

    The temporary file (``.<name>.tmp-<host>-<pid>`` beside the target) is flushed to disk before the rename,
    and removed if the block raises. Temporary files that writers killed mid-write (SIGKILL) left in the
    folder go at the next successful write: those of this target, and those of any target whose writing
    process (on this host) is gone.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remove_stale_temporaries(path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    for stale in path.parent.glob(".*.tmp-*"):
        match = _TEMP_NAME.search(stale.name)
        if match is None:
            continue
        superseded = stale.name.startswith(f".{path.name}.tmp-")  # the target was just written
        orphaned = match["host"] == _HOST and not _process_alive(int(match["pid"]))
        if superseded or orphaned:
            stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or no way to tell: keep its file
        return True
    return True


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """``Path(path).write_text(text)`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def tensor_digest(state: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of a state dict: every name, dtype, shape and the raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
            h.update(memoryview(raw.numpy()))
    return h.hexdigest()


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a truncated or corrupt file raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt file?): {e}") from e


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to a global outside the allowed numpy reconstruction (it was not executed)."""


try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): scalar,
    ("numpy._core.multiarray", "scalar"): scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to unpickle global '{module}.{name}': only numpy arrays and plain "
                                    "containers are allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r}")


def load_numpy_pickle(file: BinaryIO, *, encoding: str = "ASCII") -> Any:
    """``pickle.load`` restricted to dicts, lists, tuples, strings, numbers and numpy arrays."""
    return _NumpyUnpickler(file, encoding=encoding).load()
