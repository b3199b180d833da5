"""Dense layers whose float32 CPU products run on oneDNN where the BLAS is slower.

PyTorch's CPU wheels compute ``F.linear`` in float32 with MKL, which gives AMD processors its AVX2
kernels only; on an AVX-512 AMD processor (Zen 4/5) oneDNN's float32 matmul, shipped in the same wheel,
runs the same products 2-2.3x faster (docs/performance.md, "oneDNN for the dense layers"). Both are
IEEE float32 (no reduced-precision accumulation); they differ in summation order only, i.e. by a few
units in the last place.

:class:`Linear` is ``nn.Linear`` (same parameters, initialisation and ``state_dict``) with that
forward, and :func:`linear` the function. The oneDNN path is taken for dense float32 CPU tensors
outside autocast, ``torch.export`` (but inside :func:`~perceivers.layers.attention.native_export`), tracing,
``torch.func`` transforms and forward-mode AD (which see plain ``F.linear``), for products of at least
``2**22`` multiply-adds (below that oneDNN's fixed cost per call outweighs it). Under ``torch.compile`` the
products enter the graph as the operators ``perceivers::onednn_linear`` / ``perceivers::onednn_weight_grad``
(PyTorch's compiler would lower ``F.linear`` to MKL's kernels), and the compiler fuses the elementwise work
around them. Without autograd, :func:`linear_gelu` and :func:`linear_geglu` apply their activation in the
products' epilogues (in float32 on that path, and in bfloat16 under CPU bfloat16 autocast).
Whether it is on: ``PERCEIVERS_ONEDNN=1`` / ``0`` in the environment, :func:`use_onednn` in code, and by
default on x86 AMD processors with oneDNN available; on processors with AMX, by default also for the float32
products of a latent array at small batches (:func:`_onednn_on_amx`; in training the forward's only). The
bfloat16 paths (the epilogues under autocast, the blocked bfloat16 attention) follow :func:`onednn_bf16_enabled`:
the same switches, and by default also on processors with AMX.

On processors without bfloat16 arithmetic, where PyTorch emulates bfloat16 products at about a quarter of the
float32 rate, bfloat16 work (CPU autocast, bfloat16 tensors) is computed in float32 and returned in bfloat16
(:func:`bf16_in_float32`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from .._env import env_switch

__all__ = ["Linear", "bf16_in_float32", "geglu", "gelu", "glu", "linear", "linear_geglu", "linear_gelu", "linear_glu",
           "onednn_bf16_enabled", "onednn_enabled", "use_onednn"]

_MIN_MACS = 1 << 22
_override: bool | None = None


@functools.cache
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@torch.compiler.assume_constant_result  # torch.compile reads it instead of tracing into it
def _mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available()


@torch.compiler.assume_constant_result
def _auto() -> bool:
    return _default()  # the cache stays outside what torch.compile sees


@functools.cache
def _default() -> bool:
    setting = env_switch("PERCEIVERS_ONEDNN")
    if setting is False or not _mkldnn_available():
        return False
    if setting:
        return True
    return platform.machine().lower() in ("x86_64", "amd64") and _cpu_vendor() == "AuthenticAMD"


def onednn_enabled() -> bool:
    """Whether large float32 CPU products go to oneDNN (see the module docstring)."""
    return _auto() if _override is None else _override and _mkldnn_available()


@torch.compiler.assume_constant_result
def _auto_bf16() -> bool:
    return _default_bf16()


@functools.cache
def _default_bf16() -> bool:
    setting = env_switch("PERCEIVERS_ONEDNN")
    if setting is not None:
        return setting and _mkldnn_available()
    return _default() or (_mkldnn_available() and kernels.has_amx())


def onednn_bf16_enabled() -> bool:
    """Whether CPU bfloat16 work takes perceivers' oneDNN paths (attention as blocked bfloat16 products in
    :mod:`.onednn_attention`, activations in the products' epilogues): where the float32 products do
    (:func:`onednn_enabled`, :func:`use_onednn`) and, by default, also on Intel processors with AMX
    (:func:`~perceivers.kernels.has_amx`), whose float32 products MKL runs as fast as oneDNN but whose bfloat16
    training steps the blocked products make 0.86-0.94x as long."""
    return _auto_bf16() if _override is None else _override and _mkldnn_available()


@contextlib.contextmanager
def use_onednn(enabled: bool | None = True) -> Iterator[None]:
    """Route float32 CPU dense layers to oneDNN (``True``), to ``F.linear`` (``False``) or by default
    (``None``) inside the block; the bfloat16 paths (:func:`onednn_bf16_enabled`) follow it too."""
    global _override
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous


def _dense_weight(weight: Tensor) -> Tensor:
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        # A weight whose rows are spaced out (a slice of a wider matrix) sends oneDNN to a reference
        # kernel ~2000x slower ([2048, 512] x [512, 512 of 1024]: 6 s against 3 ms); a copy costs ~0.
        return weight.contiguous()
    return weight


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _dense_weight(weight), bias, "none", [], "")


_LONG_SUM = 48  # rows per output row + column above which torch.mm computes a weight's gradient


def _onednn_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """The weight's gradient ``gradᵀ x`` over all leading axes: ``[..., out]``, ``[..., in]`` -> ``[out, in]``.

    oneDNN's product is faster when its output's rows are the longer side (``[2048 × 4096]ᵀ [2048 × 512]``:
    ≈195 GFLOP/s as ``[4096, 512]``, ≈370 as ``[512, 4096]``), so a tall result is computed transposed and
    returned as a transposed view (autograd lays it out like the weight when it stores it). A long sum
    into a small result (rows ≥ :data:`_LONG_SUM` × (out + in), e.g. FlashPerceiver's key/value weights
    over 65536 input tokens, ``[65536 × 128]ᵀ [65536 × 128]``: 22.6 ms on oneDNN, 14.9 with MKL) goes
    to ``torch.mm``, whose kernel splits the sum between threads.
    """
    flat_grad, flat_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    a, b = (flat_x, flat_grad) if flat_grad.shape[1] > flat_x.shape[1] else (flat_grad, flat_x)
    if a.shape[0] >= _LONG_SUM * (a.shape[1] + b.shape[1]):
        result = torch.mm(a.t(), b)
    else:
        result = _onednn(_transposed(a), b.t(), None)  # oneDNN takes its first operand's rows contiguous
    return result.t() if a is flat_x else result


_TRANSPOSE = {"perceivers_transpose": ([ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2, None)}


def _transposed(a: Tensor) -> Tensor:
    """``a.t()`` for a matrix with contiguous rows: contiguous through the native kernel where it is built
    (≈3x PyTorch's strided copy, which oneDNN would otherwise make of the view), else the view."""
    lib = kernels.load("transpose", _TRANSPOSE) if a.stride(1) == 1 and _native_eager(a) else None
    if lib is None:
        return a.t()
    out = a.new_empty(a.shape[1], a.shape[0])
    lib.perceivers_transpose(a.shape[0], a.shape[1], a.stride(0), a.data_ptr(), out.data_ptr())
    return out


def _save_operands(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    ctx.save_for_backward(x, weight)


def _mm_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """The weight's gradient ``gradᵀ x`` over all leading axes with ``torch.mm``: ``[..., out]``, ``[..., in]`` ->
    ``[out, in]``."""
    return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def _linear_gradients(x: Tensor, weight: Tensor, grad: Tensor, needs: Sequence[bool], product, weight_grad):
    """The gradients of ``x Wᵀ + b`` that ``needs`` (x, W, b) asks for, with ``product`` for ``x``'s and
    ``weight_grad`` for ``W``'s (differentiable operators instead under ``create_graph=True``)."""
    need_x, need_w, need_b = needs
    if torch.is_grad_enabled():  # create_graph=True: differentiable products
        grad_x = grad @ weight if need_x else None
        grad_w = _mm_weight_grad(grad, x) if need_w else None
    else:
        grad_x = product(grad, weight.t(), None) if need_x else None
        grad_w = weight_grad(grad, x) if need_w else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if need_b else None
    return grad_x, grad_w, grad_b


class _OneDNNLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with all three products of forward and backward on oneDNN (eager)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        _save_operands(ctx, x, weight, bias)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _linear_gradients(*ctx.saved_tensors, grad, ctx.needs_input_grad, _onednn, _onednn_weight_grad)


class _OneDNNForwardLinear(_OneDNNLinear):
    """``x Wᵀ + b`` with the forward product on oneDNN and the backward's two on MKL (a latent array's products in
    training on AMX, :func:`_onednn_on_amx`: oneDNN's weight gradients are the slower there)."""

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _linear_gradients(*ctx.saved_tensors, grad, ctx.needs_input_grad, F.linear, _mm_weight_grad)


# Under ``torch.compile`` the same products as operators (``torch.library``), which the compiled graphs
# keep as opaque calls, fusing the elementwise work around them, where they would otherwise lower
# ``F.linear`` to MKL's slower kernels. (Eager calls take the autograd function above: measured faster.)


@torch.library.custom_op("perceivers::onednn_linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x Wᵀ + b`` on oneDNN: ``x [..., in]``, ``weight [out, in]`` -> ``[..., out]`` (contiguous)."""
    return _onednn(x, weight, bias).contiguous()


@_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("perceivers::onednn_weight_grad", mutates_args=())
def _weight_grad_op(grad: Tensor, x: Tensor) -> Tensor:
    """:func:`_onednn_weight_grad` as an operator."""
    return _onednn_weight_grad(grad, x)


@_weight_grad_op.register_fake
def _(grad: Tensor, x: Tensor) -> Tensor:
    out, inp = grad.shape[-1], x.shape[-1]
    return grad.new_empty(inp, out).t() if out > inp else grad.new_empty(out, inp)  # as _onednn_weight_grad


_linear_op.register_autograd(
    lambda ctx, grad: _linear_gradients(*ctx.saved_tensors, grad, ctx.needs_input_grad, _linear_op, _weight_grad_op),
    setup_context=lambda ctx, inputs, output: _save_operands(ctx, *inputs),
)


def _onednn_usable(*tensors: Tensor) -> bool:
    """Whether oneDNN's float32 products may serve these operands here: dense float32 CPU tensors outside
    autocast, where :func:`_kernels_usable`."""
    return (_kernels_usable(*tensors)  # first: off (Intel's float32) is the usual answer
            and all(t.dtype == torch.float32 for t in tensors) and not torch.is_autocast_enabled("cpu"))


def _kernels_usable(*tensors: Tensor, bf16: bool = False) -> bool:
    """Whether perceivers' own CPU kernels may serve these operands: dense CPU tensors with oneDNN on (for
    ``bf16`` work, :func:`onednn_bf16_enabled`),
    outside ``torch.export`` (but inside :func:`~perceivers.layers.attention.native_export`), tracing,
    ``torch.func`` transforms and forward-mode AD (graphs that are exported must see the standard operators;
    the oneDNN operators define no ``vmap``/``jvp``). Under ``torch.compile`` the operators enter the graph (see
    above)."""
    enabled = onednn_bf16_enabled() if bf16 else onednn_enabled()  # first: off (Intel's float32) is the usual answer
    if not (enabled and all(t.is_cpu and t.layout == torch.strided for t in tensors)):
        return False
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting() or _exporting_native()
    return _plain_eager()


_native_export = False  # see perceivers.layers.attention.native_export


def _exporting_native() -> bool:
    """Whether a ``torch.export`` trace may keep perceivers' operators: inside
    :func:`~perceivers.layers.attention.native_export`, outside ONNX export (ONNX has no such operators)."""
    return _native_export and torch.compiler.is_exporting() and not torch.onnx.is_in_onnx_export()


def _plain_eager() -> bool:
    """Outside tracing, scripting, ``torch.func`` transforms and forward-mode AD: where perceivers' own
    kernels (which define no ``vmap``/``jvp`` and are not traceable) may run eagerly."""
    return not torch.jit.is_tracing() and not torch.jit.is_scripting() and not _func_transforms()


def _func_transforms() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, …) or forward-mode AD is active."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def _dense(tensors: tuple[Tensor, ...], dtype: torch.dtype, *, traced: bool = False) -> bool:
    """Dense CPU tensors of ``dtype``, not subclasses (whose storage may not be theirs) unless ``traced`` (the
    fake tensors of a ``torch.export`` trace)."""
    return all((traced or type(t) in (Tensor, nn.Parameter)) and t.dtype == dtype and t.device.type == "cpu"
               and t.layout == torch.strided for t in tensors)


def _native_eager(*tensors: Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Whether perceivers' native kernels (:mod:`perceivers.kernels`, called with the tensors' data
    pointers) may take these: dense CPU tensors of ``dtype`` (:func:`_dense`), eager outside
    :func:`_plain_eager`'s exceptions, ``torch.compile`` (which fuses the standard operators itself) and
    dispatch modes (fake tensors, FLOP counters: those see the standard operators)."""
    return (
        _dense(tensors, dtype) and not torch.compiler.is_compiling() and _plain_eager()
        and not torch._C._len_torch_dispatch_stack()
    )


def _native_usable(*tensors: Tensor, dtype: torch.dtype = torch.float32, compiled: bool = True) -> bool:
    """Where a native kernel may take these: eagerly (:func:`_native_eager`) or, with ``compiled``, under
    ``torch.compile`` as an operator the compiled graph keeps (``torch.library``; under ``torch.export`` only inside
    :func:`~perceivers.layers.attention.native_export`: other programs must see the standard operators), on dense
    CPU tensors of ``dtype``."""
    if torch.compiler.is_compiling():
        if torch.compiler.is_exporting():
            return compiled and _exporting_native() and _dense(tensors, dtype, traced=True)
        return compiled and _dense(tensors, dtype)
    return _native_eager(*tensors, dtype=dtype)


def _large(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x Wᵀ`` is a product large enough for oneDNN's fixed cost per call (``_MIN_MACS``); a symbolic size
    of an exported program counts as large (a test would become a guard of the program, refusing other sizes)."""
    if x.dim() < 2 or weight.dim() != 2:
        return False
    macs = x.numel() * weight.shape[0]
    return (not isinstance(macs, int) and torch.compiler.is_exporting()) or macs >= _MIN_MACS


def _use_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    # usability first: under export (outside native_export) it is False, and the size test is never asked (on a
    # symbolic batch it would become a guard of the exported program, refusing batches above the threshold)
    return (_onednn_usable(x, weight, *(() if bias is None else (bias,))) and _large(x, weight)) or _onednn_on_amx(
        x, weight, bias)


_AMX_ROWS, _AMX_MACS = 512, 1 << 26  # see _onednn_on_amx


def _onednn_on_amx(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a float32 product goes to oneDNN on a processor with AMX, whose float32 products otherwise stay
    MKL's: one of at most :data:`_AMX_ROWS` rows and :data:`_AMX_MACS` multiply-adds, as a latent array's at batch
    1 (``[256, 512] × [512, 4096]``: 3.23 against 3.60 ms; ``[2048, 768] × [768, 768]``, not taken, 6.93 against
    6.68 ms). Inference of the README Perceiver at 1k-64k inputs, batch 1: 0.92-0.97x the time, the official
    language model's 0.90-0.92x; in training only the forward product is oneDNN's (:class:`_OneDNNForwardLinear`):
    the official language model's step 0.96-0.97x (docs/performance.md, "oneDNN for a latent array's products on
    AMX"). Not under autocast, ``torch.compile`` or ``torch.export``, nor where ``PERCEIVERS_ONEDNN`` or
    :func:`use_onednn` decides."""
    if (_override is not None or torch.compiler.is_compiling() or not kernels.has_amx()  # Dynamo: no flags
            or x.dim() < 2 or weight.dim() != 2 or not x.shape[-1]):
        return False
    rows = x.numel() // x.shape[-1]
    if rows > _AMX_ROWS or rows * x.shape[-1] * weight.shape[0] < _AMX_MACS:
        return False
    operands = (x, weight) if bias is None else (x, weight, bias)
    return (env_switch("PERCEIVERS_ONEDNN") is None and _mkldnn_available()
            and _dense(operands, torch.float32) and not torch.is_autocast_enabled("cpu") and _plain_eager()
            and not torch._C._len_torch_dispatch_stack())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., in]``, ``weight [out, in]`` -> ``[..., out]``."""
    # asked on every dense layer: the cheapest tests first (a small layer's product takes a few µs)
    autocast = torch.is_autocast_enabled("cpu")
    if autocast or x.dtype == torch.bfloat16:  # where bf16_in_float32 may hold; oneDNN's float32 path never does
        if bf16_in_float32(x, weight, bias):
            if _records_graph(x, weight, bias):
                return _Bf16InFloat32Linear.apply(x, x.to(torch.bfloat16), weight, bias)
            return _bf16_linear_forward(x, weight, bias)
        if autocast and _uncached_autocast(x, weight, bias):
            return F.linear(*_autocast_operands(x, weight, bias))
        return F.linear(x, weight, bias)
    if not _use_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _linear_op(x, weight, bias)
    if _records_graph(x, weight, bias):  # on AMX, where oneDNN is not on, a latent array's product (_onednn_on_amx)
        return (_OneDNNLinear if onednn_enabled() else _OneDNNForwardLinear).apply(x, weight, bias)
    return _onednn(x, weight, bias)


def _records_graph(*operands: Tensor | None) -> bool:
    """Whether autograd records an operation on these (grad mode on and an operand requires a gradient)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)


def _uncached_autocast(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a product under CPU bfloat16 autocast without autograd casts its float32 weight itself, eagerly: the
    copy is freed after the product, where autocast's cast would be kept to the end of the autocast region (a
    weight's bfloat16 copy for every layer of the forward at once: the README Perceiver at 64k inputs, 24M
    parameters, 57-59 -> 33-38 MiB peak)."""
    return (weight.dtype == torch.float32 and not _records_graph(x, weight, bias) and weight.is_cpu
            and _cpu_autocast_bf16() and not torch.compiler.is_compiling())


def _cpu_autocast_bf16() -> bool:
    """Whether CPU autocast to bfloat16 is on."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _autocast_operands(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """CPU tensors cast to bfloat16 under CPU bfloat16 autocast, as autocast casts a product's operands (for
    calls that autocast does not see: oneDNN's operators, the blocked attention); others unchanged."""
    if tensors[0].is_cpu and _cpu_autocast_bf16():
        return tuple(None if t is None else t.to(torch.bfloat16) for t in tensors)
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 on processors without bfloat16 arithmetic


def bf16_in_float32(*tensors: Tensor | None) -> bool:
    """Whether bfloat16 products of these operands are computed in float32 here: on a processor that would emulate
    them (:func:`~perceivers.kernels.emulates_bf16`: x86 without AVX512-BF16 or AMX, where PyTorch's bfloat16
    product runs at about a quarter of the float32 rate), eagerly, for dense CPU tensors that are bfloat16 or
    under CPU bfloat16 autocast. ``PERCEIVERS_BF16_AS_FLOAT32=0`` keeps PyTorch's emulated products, ``=1`` takes
    this path on any processor."""
    dtypes = {t.dtype for t in tensors if t is not None}  # asked on every product: cheap tests first
    if not (dtypes == _BF16 or (dtypes <= _BF16_OR_FLOAT32 and _cpu_autocast_bf16())):
        return False  # float32 outside autocast leaves here
    if torch.compiler.is_compiling():  # before the setting and the processor, which Dynamo would not trace
        return False  # compiled and exported graphs see the standard operators
    setting = env_switch("PERCEIVERS_BF16_AS_FLOAT32")
    if not (kernels.emulates_bf16() if setting is None else setting):  # the usual answer, asked first
        return False
    return (all(t is None or (t.is_cpu and t.layout == torch.strided) for t in tensors) and _plain_eager()
            and not torch._C._len_torch_dispatch_stack())  # fake tensors and FLOP counters see the standard ones


_BF16, _BF16_OR_FLOAT32 = frozenset({torch.bfloat16}), frozenset({torch.bfloat16, torch.float32})


def _float(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.float() for t in tensors)


def _bf16_linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x Wᵀ + b`` in float32 arithmetic on the operands as they come (bfloat16 ones widened, float32 ones as
    they are: autocast would round them first), rounded to bfloat16 once."""
    with torch.autocast("cpu", enabled=False):
        return linear(*_float(x, weight, bias)).to(torch.bfloat16)


class _Bf16InFloat32Linear(torch.autograd.Function):
    """``x Wᵀ + b`` returning bfloat16 as autocast's product does, with float32 products (:func:`bf16_in_float32`).
    Keeps ``x_bf16`` (``x`` in bfloat16, a recorded cast: autocast's memory, and second-order gradients reach ``x``
    through it) and the weight itself; the gradients are float32 products of the bfloat16 output gradient, in the
    operands' dtypes."""

    @staticmethod
    def forward(ctx, x: Tensor, x_bf16: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_bf16, weight)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _bf16_linear_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad
        with torch.autocast("cpu", enabled=False):
            g, x, weight = _float(grad, x, weight)
            weight_grad = _onednn_weight_grad if _onednn_usable(g, x) else _mm_weight_grad
            grads = _linear_gradients(x, weight, g, (need_x, need_w, need_b), linear, weight_grad)
        grad_x, grad_w, grad_b = (None if t is None else t.to(dtype) for t, dtype in zip(grads, ctx.dtypes, strict=True))
        return grad_x, None, grad_w, grad_b


def _in_float32_without_grad(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether a bfloat16 product and its activation run in float32 (:func:`bf16_in_float32`) without autograd:
    then the activation is applied in float32 too and the result rounded to bfloat16 once."""
    return not _records_graph(x, weight, bias) and bf16_in_float32(x, weight, bias)


def _epilogue_operands(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple | None:
    """The operands with which the product may apply its elementwise epilogue itself, or ``None``: eager,
    no gradient, and either the float32 oneDNN path or CPU bfloat16 autocast (operands cast as autocast
    casts them; oneDNN's bfloat16 kernels)."""
    if torch.compiler.is_compiling() or _records_graph(x, weight, bias):
        return None
    if _use_onednn(x, weight, bias):
        return x, weight, bias
    if (_cpu_autocast_bf16() and _large(x, weight) and _kernels_usable(x, weight, bf16=True)
            and torch.ops.mkldnn._is_mkldnn_bf16_supported() and not bf16_in_float32(x, weight, bias)):
        return _autocast_operands(x, weight, bias)
    return None


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``gelu(x Wᵀ + b)``: ``[..., in]`` -> ``[..., out]``. Without autograd, on the oneDNN path or under
    bfloat16 autocast, the GELU is the product's epilogue (no pass of its own over the output); elsewhere the tanh
    form's native kernel adds the float32 bias (:func:`~.native_activation.takes_bias`)."""
    if _in_float32_without_grad(x, weight, bias):
        with torch.autocast("cpu", enabled=False):
            return linear_gelu(*_float(x, weight, bias), approximate).to(torch.bfloat16)
    operands = _epilogue_operands(x, weight, bias)
    if operands is not None:
        x, weight, bias = operands
        return torch.ops.mkldnn._linear_pointwise(x, _dense_weight(weight), bias, "gelu", [], approximate)
    if approximate == "tanh":  # the exact GELU is PyTorch's, which takes no bias
        return _product_then(lambda h, bias=None: gelu(h, approximate, bias), x, weight, bias)
    return gelu(linear(x, weight, bias), approximate)


def _product_then(activation, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``activation(x Wᵀ + b)`` for a native activation kernel (``activation(h, bias)``), which adds the bias itself
    where it takes it (:func:`_bias_in_activation`), or after a biased product."""
    if _bias_in_activation(x, weight, bias):
        return activation(linear(x, weight), bias)
    return activation(linear(x, weight, bias))


def _bias_in_activation(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the native activation kernel after the product ``x Wᵀ + b`` adds its bias
    (:func:`~.native_activation.takes_bias`)."""
    from . import native_activation  # it imports this module

    return native_activation.takes_bias(x, weight, bias)


def gelu(h: Tensor, approximate: str = "none", bias: Tensor | None = None) -> Tensor:
    """``F.gelu(h + bias, approximate=approximate)``: ``h [..., n]``, ``bias [n]`` or ``None``; the tanh form of
    float32 and bfloat16 CPU tensors goes to a native kernel, forward and backward, which adds the bias itself
    (:mod:`.native_activation`)."""
    from . import native_activation  # it imports this module

    if approximate == "tanh" and native_activation.applies(h, "gelu_tanh") and _bias_fits(h, bias):
        return native_activation.gelu_tanh(h, bias)
    return F.gelu(h if bias is None else h + bias, approximate=approximate)


def _bias_fits(h: Tensor, bias: Tensor | None) -> bool:
    """Whether a native activation kernel may add ``bias`` to ``h`` (none, or one of ``h``'s dtype per channel)."""
    return bias is None or (bias.dtype == h.dtype and bias.shape == h.shape[-1:])


def softmax(x: Tensor) -> Tensor:
    """``x.softmax(-1)``; float32 and bfloat16 CPU tensors of at least 2¹⁵ elements go to a native kernel
    (:mod:`.native_activation`: 1.5-1.7x PyTorch's forward; the backward is PyTorch's)."""
    from . import native_activation  # it imports this module

    if native_activation.applies(x, "softmax"):
        return native_activation.softmax(x)
    return x.softmax(-1)


def linear_geglu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a · gelu(g)`` where ``[a, g] = x Wᵀ + b`` are the two halves of the output: ``[..., in]`` ->
    ``[..., out / 2]``. Without autograd, on the oneDNN path or under bfloat16 autocast, it is two products
    whose epilogues apply the GELU and the product (README Perceiver's 2048 × 512 → 4096 layer: 40 → 26 ms
    in float32); elsewhere the native GEGLU kernel adds the float32 bias (:func:`~.native_activation.takes_bias`)."""
    if _in_float32_without_grad(x, weight, bias):
        with torch.autocast("cpu", enabled=False):
            return linear_geglu(*_float(x, weight, bias)).to(torch.bfloat16)
    operands = _epilogue_operands(x, weight, bias)
    if operands is not None:
        x, weight, bias = operands
        half = weight.shape[0] // 2
        value_bias, gate_bias = (None, None) if bias is None else (bias[:half], bias[half:])
        pointwise = torch.ops.mkldnn._linear_pointwise
        gate = pointwise(x, _dense_weight(weight[half:]), gate_bias, "gelu", [], "none")
        return pointwise.binary(x, gate, _dense_weight(weight[:half]), value_bias, "mul")
    return _product_then(geglu, x, weight, bias)


def linear_glu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a · sigmoid(g)`` where ``[a, g] = x Wᵀ + b`` are the two halves of the output (``F.glu(F.linear(…))``):
    ``[..., in]`` -> ``[..., out / 2]``; the native GLU kernel adds the float32 bias
    (:func:`~.native_activation.takes_bias`)."""
    return _product_then(glu, x, weight, bias)


def glu(h: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a · sigmoid(g)`` for ``h + bias = [a, g]`` (``F.glu`` over the last axis): ``[..., 2n]``, ``bias [2n]`` or
    ``None`` -> ``[..., n]``. Float32 and bfloat16 CPU tensors go to a native kernel, forward and backward in one
    pass each, which adds the bias itself (:mod:`.native_activation`)."""
    from . import native_activation  # it imports this module

    if native_activation.applies(h, "glu") and _bias_fits(h, bias):
        return native_activation.glu(h, bias)
    return F.glu(h if bias is None else h + bias, dim=-1)


def geglu(h: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a · gelu(g)`` for ``h + bias = [a, g]`` (halves of the last axis): ``[..., 2n]``, ``bias [2n]`` or
    ``None`` -> ``[..., n]``. Float32 and bfloat16 CPU tensors go to a native kernel, forward and backward in one
    pass each, which adds the bias itself (:mod:`.native_activation`)."""
    from . import native_activation  # it imports this module

    if native_activation.applies(h) and _bias_fits(h, bias):
        return native_activation.geglu(h, bias)
    value, gate = (h if bias is None else h + bias).chunk(2, dim=-1)
    return value * F.gelu(gate)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, init and ``state_dict``)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
