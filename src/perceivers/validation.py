"""Input checks shared by the public entry points: models, processors, loaders, batching.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
values or device) naming what was expected and what came, before any heavy work is done.

NaN/Inf policy
--------------
:func:`check_finite` checks model inputs (not activations) with one float32-accumulated sum — finite
exactly when every element is; only a non-finite sum runs the elementwise test — and, on an
accelerator, one host sync. Measured on one CPU core (``scripts/reliability_report.py``,
docs/reliability.md): ~15–20 µs for a 224×224 image, 0.1–0.4 ms for a 16-frame 224×224 video (15–50× less
than ``torch.isfinite(x).all()``), 0.0001 % of an official ImageNet forward. It is therefore **on by
default** in eager mode and skipped automatically while compiling, tracing or exporting
(``torch.compile``, ``torch.export``, ``torch.jit.trace``, ONNX export), where a data-dependent branch
would break the graph. Turn it off for latency-critical accelerator
serving with :func:`set_finite_checks` (``False``), the :func:`finite_checks` context manager or
the environment variable ``PERCEIVERS_CHECK_FINITE=0``.

Narrow inputs
-------------
A cross-attention LayerNorm over a context of 1 channel maps every element to the same vector
(the model cannot see its input: krasserm/perceiver-io#14); 2 or 3 channels keep little. Building a
cross-attention whose context or queries have fewer than :data:`MIN_NORMALISED_CHANNELS` channels
emits a :class:`NarrowContextWarning`: add position features or project / patch the input first.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ._env import env_switch
from .layers.blocks import MIN_NORMALISED_CHANNELS, NarrowContextWarning

__all__ = [
    "MIN_NORMALISED_CHANNELS",
    "NarrowContextWarning",
    "as_bool_mask",
    "check_config_types",
    "check_count",
    "check_finite",
    "check_index_range",
    "check_like",
    "check_tensor",
    "data_dependent_checks",
    "finite_checks",
    "finite_checks_enabled",
    "is_int",
    "module_device_dtype",
    "set_finite_checks",
]

_FINITE = env_switch("PERCEIVERS_CHECK_FINITE") is not False
_THREAD = threading.local()  # .finite: a finite_checks block's setting in this thread (None outside any)


def finite_checks_enabled() -> bool:
    """Whether :func:`check_finite` currently inspects values in this thread (see the module docstring)."""
    local = getattr(_THREAD, "finite", None)
    return _FINITE if local is None else local


def set_finite_checks(enabled: bool) -> bool:
    """Turn the NaN/Inf input checks on or off for the whole process; returns the previous setting."""
    global _FINITE
    previous, _FINITE = _FINITE, bool(enabled)
    return previous


@contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """``with finite_checks(False): model(x)`` — the NaN/Inf input checks off (or on) inside the block, in this
    thread only: threads serving requests each keep their own setting (blocks that overlap in different threads
    used to restore each other's, leaving the checks off for the whole process)."""
    previous = getattr(_THREAD, "finite", None)
    _THREAD.finite = bool(enabled)
    try:
        yield
    finally:
        _THREAD.finite = previous


def data_dependent_checks() -> bool:
    """False while compiling, tracing or exporting, and under ``torch.func`` transforms (``vmap``'s batched values
    cannot be read): checks that read tensor values must not run then."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch._C._are_functorch_transforms_active()):
        return False
    onnx = getattr(torch, "onnx", None)
    return not (onnx is not None and getattr(onnx, "is_in_onnx_export", lambda: False)())


def check_index_range(x: Tensor, upper: int, name: str) -> None:
    """Raise if integer ``x`` has a value outside ``[0, upper)`` (skipped while compiling or exporting)."""
    if x.numel() and data_dependent_checks():
        low, high = int(x.min()), int(x.max())
        if low < 0 or high >= upper:
            raise ValueError(f"{name} must lie in [0, {upper}), got [{low}, {high}]")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def check_tensor(
    x: object,
    name: str,
    *,
    kind: str | None = "float",
    ndim: int | Sequence[int] | None = None,
    layout: str | None = None,
    allow_empty: bool = False,
) -> Tensor:
    """Check that ``x`` is a tensor of the right kind, rank and non-empty; return it.

    Args:
        kind: ``"float"`` (floating point), ``"int"`` (integer, not bool), ``"bool"``, or None (any).
        ndim: allowed number of dimensions (one int or several).
        layout: how the expected shape reads in the message, e.g. ``"[batch, channels, height, width]"``.
        allow_empty: accept tensors with a zero-sized dimension.
    """
    want = f" {layout}" if layout else ""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{want}, got {_describe(x)}")
    if kind == "float" and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor{want}, got dtype {x.dtype}")
    if kind == "int" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor{want} (e.g. torch.int64), got dtype {x.dtype}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a torch.bool tensor{want}, got dtype {x.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            dims = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {dims} dims{want}, got {x.ndim} dims with shape {tuple(x.shape)}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}{f' (expected {layout})' if layout else ''}")
    return x


def check_finite(x: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` if the floating-point tensor ``x`` holds NaN or ±Inf (when checks are on)."""
    # (compiling: data_dependent_checks is False before the thread's setting would be read)
    if x.device.type == "meta" or not (x.is_floating_point() and data_dependent_checks() and finite_checks_enabled()):
        return x
    # One reduction instead of a boolean tensor: the sum is finite only if every element is (NaN
    # propagates, +Inf and -Inf give NaN). A non-finite sum of finite values (overflow) goes to the
    # exact elementwise test, so the answer is always exact; half types accumulate in float32.
    total = x.sum(dtype=torch.float32 if x.element_size() < 4 else None)
    if bool(torch.isfinite(total)) or bool(torch.isfinite(x).all()):
        return x
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    raise ValueError(
        f"{name} must be finite, got {nan} NaN and {inf} Inf values in shape {tuple(x.shape)} "
        f"(dtype {x.dtype}); clean the input, or disable this check with "
        "perceivers.validation.set_finite_checks(False)"
    )


def module_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of ``module``'s first floating-point parameter (or buffer)."""
    for t in itertools.chain(module.parameters(), module.buffers()):  # lazily: the first one usually answers
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def check_like(x: Tensor, module: nn.Module, name: str, *, dtype: bool = True) -> Tensor:
    """Raise if ``x`` is on another device than ``module``, or (floating ``x``) has another dtype.

    The dtype check is skipped under ``torch.autocast``, which casts per operation.
    """
    device, param_dtype = module_device_dtype(module)
    if device is None:
        return x
    if x.device != device:
        raise ValueError(f"{name} is on device {x.device} but the model is on {device}; move one of them "
                         f"(model.to({str(x.device)!r}) or {name}.to({str(device)!r}))")
    if (dtype and x.is_floating_point() and x.dtype != param_dtype
            and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {param_dtype}; "
                        f"cast one of them (model.to({x.dtype}) or {name}.to({param_dtype})) or run under "
                        "torch.autocast")
    return x


def as_bool_mask(mask: object, name: str) -> Tensor | None:
    """A boolean mask (True = attend) from a bool, integer or float 0/1 tensor; ``None`` passes.

    Non-boolean masks must hold only 0 and 1 (1 = attend): an additive mask (0 = attend,
    ``-inf`` or ``-1e9`` = ignore) would otherwise be silently inverted, so it is refused.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool, or 0/1 integers; True/1 = attend), got "
                        f"{_describe(mask)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 integers/floats (True/1 = attend), got dtype {mask.dtype}")
    if data_dependent_checks() and mask.device.type != "meta" and mask.numel():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            example = mask[bad].flatten()[0].item()
            raise ValueError(
                f"{name} must hold only 0/1 (or True/False; 1 = attend, 0 = ignore), got the value {example!r} "
                f"(dtype {mask.dtype}); an additive mask (0 = attend, -inf = ignore) is not accepted — "
                f"pass `{name} == 0` for one"
            )
    return mask != 0


def check_count(*, minimum: int = 1, **counts: object) -> None:
    """Raise a ValueError naming the first of ``counts`` (sizes, depths) that is not an int ``>= minimum``."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON's ``true`` is no size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _ints(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and len(v) == n and all(map(is_int, v))


#: what a config field of each annotation holds: a description and a test (JSON's kinds: ``true`` is not an
#: int, an int is a float); ``X | None`` also takes ``None``
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an int", is_int),
    "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "bool": ("a bool", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "dict": ("an object", lambda v: isinstance(v, Mapping)),
    "tuple[int, int]": ("a list of 2 ints", _ints(2)),
    "tuple[int, int, int, int]": ("a list of 4 ints", _ints(4)),
}


def _kind(annotation: str) -> tuple[str, Callable[[Any], bool]] | None:
    base = annotation.removesuffix(" | None")
    if base not in _KINDS:
        return None
    what, ok = _KINDS[base]
    return (what, ok) if base == annotation else (f"{what} or null", lambda v: v is None or ok(v))


def check_config_types(values: Mapping[str, Any], config_cls: type) -> None:
    """Raise ``TypeError`` naming the first field of the dataclass ``config_cls`` in ``values`` (overrides, a
    ``config.json`` dict) whose value is not of the field's annotated type (``int``, ``float | None``, …),
    with the value that came. Other keys, and fields of other annotations, are not looked at."""
    for f in dataclasses.fields(config_cls):
        kind = _kind(str(f.type)) if f.name in values else None
        if kind is not None:
            what, ok = kind
            value = values[f.name]
            if not ok(value):
                raise TypeError(f"config field {f.name!r} must be {what}, got {value!r} ({type(value).__name__})")
