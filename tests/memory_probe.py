"""Dispatch modes that record the floating-point tensors operations create (for memory tests)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestFloatOutput(TorchDispatchMode):
    """``with LargestFloatOutput() as probe: ...`` → ``probe.largest``: elements of the largest new float tensor
    (outputs that share storage with an input, i.e. views and in-place results, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


class PeakLiveFloat(TorchDispatchMode):
    """``with PeakLiveFloat() as probe: ...`` → ``probe.peak``: the most bytes of floating-point storage created
    inside the context that were alive at the same time (a storage lives while a tensor or view of it that an
    operation returned does; tensors kept only by autograd are not seen, so use it without gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [tensors alive, bytes]

    def _release(self, ptr: int) -> None:
        entry = self._refs[ptr]
        entry[0] -= 1
        if not entry[0]:
            self.live -= entry[1]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._refs:
                self._refs[ptr][0] += 1  # a view of a storage made inside
            elif ptr not in inputs and ptr:
                nbytes = t.untyped_storage().nbytes()
                self._refs[ptr] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            else:
                continue
            weakref.finalize(t, self._release, ptr)
        return out
