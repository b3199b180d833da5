"""Cross-attention over an image grid with separable position features, through a native kernel.

A Perceiver's context on an ``H × W`` grid is ``x_n = [d_n, T_h[i] + T_w[j]]`` for pixel ``n = (i, j)``:
``D`` data channels and position features that are a sum of two per-axis tables with disjoint
channels (Fourier features; see :meth:`FourierPositionEncoding.grid_rows`). With the LayerNorm
``c_n = γ ∘ (x_n − μ_n) / σ_n + β`` and the queries folded into the context's space (``q̃ = q W_k``,
see :attr:`Attention.fold_kv`), each score splits as

    q̃·c_n = (1/σ_n) · (u_d·d_n + A_h[i] + A_w[j] − G μ_n) + q̃·β,    u = q̃ ∘ γ, G = Σ u,

with ``A_h = u_pos T_hᵀ`` and ``A_w = u_pos T_wᵀ`` computed once per query (the last term is the same
for every key and cancels), and ``μ_n``, ``σ_n`` themselves separate the same way (the tables' channels
are disjoint, so ``Σ x² = Σ d² + Σ T_h[i]² + Σ T_w[j]²``). The weighted sum ``Σ p_n c_n`` needs only
``Σ p d/σ``, ``Σ p μ/σ`` and the per-row and per-column sums of ``p/σ`` (which meet the tables
afterwards). So a score costs ``D + 2`` multiply-adds and the weighted sum ``D + 3`` instead of
``2 × (D + C_pos)``: for RGB with 26 Fourier channels, 5 + 6 against 64. The native kernel
(:mod:`perceivers.kernels`, ``grid_attention.c``) runs the online softmax over chunks of image rows;
this module prepares its inputs and assembles the output.

Training: the gradient of the weighted sum reduces to the same structure. With the upstream gradient
``g`` per query and ``v = g ∘ γ``, the score gradients are ``p_n (v·x̂_n − v·x̄)`` (``x̂`` the normalised
features, ``x̄ = Σ p x̂``), and ``v·x̂_n`` separates like a score; their weighted sum ``Σ_n ds_n x̂_n`` gives
the query's gradient (``γ ∘`` it) and, with ``x̄``, the LayerNorm's. The backward kernel rebuilds ``p``
from the saved log-sum-exp (no score is stored). Gradients flow to the queries and to every weight
(``to_q``, ``W_k``, ``W_v``, ``to_out``, the LayerNorm), not to the image itself: when the image
requires grad, or with attention dropout, or a key mask, the caller takes its PyTorch path.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import kernels
from .dense import _native_usable
from .stream import GridContext

__all__ = ["applies", "available", "grid_cross_attention", "serves"]

# Pixels per kernel call (over the batch): their planes (5 floats each for RGB: 1.3 MiB) stay in the caches.
GRID_CHUNK = 1 << 16
# Smaller images are not worth a call: at 16×16 (batch 32, training) the PyTorch path was 7% faster,
# at 32×32 the kernel 11% (a 32×64 Perceiver, 2 threads).
MIN_PIXELS = 1024


_SIGNATURES = {
    "perceivers_grid_attention": ([ctypes.c_int64] * 7 + [ctypes.c_void_p] * 9, ctypes.c_int),
    "perceivers_grid_planes": ([ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4
                               + [ctypes.c_double, ctypes.c_void_p], None),
    "perceivers_grid_attention_backward": ([ctypes.c_int64] * 7 + [ctypes.c_void_p] * 12, ctypes.c_int),
}


def _kernel():
    return kernels.load("grid_attention", _SIGNATURES)


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once, not traced (it builds and loads a library)
def available() -> bool:
    """Whether the native kernel is built and enabled (``PERCEIVERS_NATIVE``)."""
    return _kernel() is not None


def serves(data: Tensor, *, masked: bool, dropout: bool = False, pixels: int | None = None) -> bool:
    """Whether a grid context built from ``data`` would go through the kernel: a float32 CPU tensor where the
    native kernels run (:func:`.dense._native_usable`: eager without a dispatch mode such as fake tensors or
    FLOP counters, which see the standard operators, or under ``torch.compile`` as operators the compiled graph
    keeps, under ``torch.export`` only inside :func:`~perceivers.layers.attention.native_export`), also under autocast (see :func:`grid_cross_attention`), the
    image itself not needing a gradient, no key mask, no attention dropout; with ``pixels`` (per sample), at
    least :data:`MIN_PIXELS` of them (models use it to give images too small to stream to the kernel as one
    chunk)."""
    return (  # the size test last, and none of a symbolic size under torch.export: it would be a guard of the program
        not (torch.is_grad_enabled() and data.requires_grad) and not masked and not dropout
        and _native_usable(data) and available()
        and (pixels is None or (not isinstance(pixels, int) and torch.compiler.is_exporting()) or pixels >= MIN_PIXELS)
    )


def applies(attn: nn.Module, norm: nn.Module, x: Tensor, grid: GridContext, mask: Tensor | None) -> bool:
    """Whether :func:`grid_cross_attention` handles this call (see :func:`serves`; a folding
    ``attn`` behind a ``LayerNorm`` over the grid's channels, float32 queries)."""
    return (
        attn.fold_kv is not False
        and isinstance(norm, nn.LayerNorm)
        and tuple(norm.normalized_shape) == (attn.kv_dim,)
        and grid.channels == attn.kv_dim
        and x.device.type == "cpu" and x.dtype == torch.float32
        and serves(grid.data, masked=mask is not None, dropout=attn.training and attn.dropout > 0)
    )


def grid_cross_attention(
    attn: nn.Module, norm: nn.LayerNorm, x: Tensor, grid: GridContext, *, query_mask: Tensor | None = None,
    chunk_pixels: int = GRID_CHUNK,
) -> Tensor:
    """``attn(x, norm(context))`` for queries ``x [B, Q, q_dim]`` (already normalised) → ``[B, Q, out_dim]``.

    Call only when :func:`applies`. The grid is processed in chunks of whole image rows of about
    ``chunk_pixels`` pixels over the batch (their planes, ``D + 2`` floats per pixel, are all that is built).
    Differentiable in ``x`` and in the weights of ``attn`` and ``norm``. Under CPU autocast it computes
    in float32 and returns float32, as autocast does for its float32 operators: the kernel has no
    bfloat16 variant, and its ``D + 2``-channel float32 work is cheaper than bfloat16 products over the
    whole context (measured in docs/performance.md, *bfloat16 on CPU*).
    """
    with torch.autocast("cpu", enabled=False):
        return _attend_grid(attn, norm, x, grid, query_mask, chunk_pixels)


def _attend_grid(attn: nn.Module, norm: nn.LayerNorm, x: Tensor, grid: GridContext, query_mask: Tensor | None,
                 chunk_pixels: int) -> Tensor:
    heads = attn.num_heads
    q = rearrange(attn.to_q(x), "b n (h e) -> b h n e", h=heads) * (attn.qk_channels // heads) ** -0.5
    qf = attn._fold_queries(q)  # [B, H, Q, C]
    c = qf.shape[-1]
    gamma = norm.weight if norm.weight is not None else qf.new_ones(c)
    beta = norm.bias if norm.bias is not None else qf.new_zeros(c)
    eps = float(norm.eps)
    if torch.compiler.is_compiling():  # Σ p_n c_n
        weighted = _grid_op(qf, gamma, beta, grid.data, *grid.tables, eps, chunk_pixels)[0]
    else:
        weighted = _GridAttention.apply(qf, gamma, beta, grid, eps, chunk_pixels)
    out = attn._unfold_values(weighted)
    if query_mask is not None:
        out = out * query_mask[:, None, :, None].to(out.dtype)
    return attn.to_out(rearrange(out, "b h n e -> b n (h e)"))


class _Planes:
    """The kernel's per-pixel planes of a grid, chunk by chunk (LayerNorm statistics per pixel separate
    like the features: per-axis sums and sums of squares of the tables, in double precision)."""

    def __init__(self, lib, grid: GridContext, eps: float, chunk_pixels: int) -> None:
        self.lib, self.grid, self.eps = lib, grid, eps
        self.batch, self.d = grid.data.shape[0], grid.data.shape[-1]
        self.height, self.width = grid.shape
        t_h, t_w = (t.to(torch.float64) for t in grid.tables)
        self.channels = self.d + t_h.shape[-1]
        self.sums = [t.sum(-1).contiguous() for t in (t_h, t_w)]
        self.squares = [(t * t).sum(-1).contiguous() for t in (t_h, t_w)]
        self.rows = max(1, chunk_pixels // (self.width * self.batch))
        self.buffer = torch.empty((self.batch, self.d + 2, min(self.height, self.rows) * self.width), dtype=torch.float32)

    def __iter__(self):
        """Yields ``(i0, i1, planes [B, D + 2, n])`` for image rows ``i0:i1`` of every sample."""
        w, d = self.width, self.d
        data = self.grid.data.detach()
        for i0 in range(0, self.height, self.rows):
            i1 = min(self.height, i0 + self.rows)
            n = (i1 - i0) * w
            rows = data[:, i0:i1].reshape(self.batch, n, d)  # a view for contiguous inputs
            if rows.stride(2) != 1 or rows.stride(1) != d:
                rows = rows.contiguous()
            self.lib.perceivers_grid_planes(
                self.batch, n, w, d, self.channels, i0, rows.data_ptr(), rows.stride(0), self.sums[0].data_ptr(),
                self.squares[0].data_ptr(), self.sums[1].data_ptr(), self.squares[1].data_ptr(), self.eps,
                self.buffer.data_ptr(),
            )
            yield i0, i1, self.buffer


def _coefficients(u: Tensor, d: int, tables: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``u [B, H, Q, C]`` (a query times γ) → the kernel's ``[B, rows, D + 1]`` (data part, −Σu) and the
    per-axis tables ``[B, rows, H]``, ``[B, rows, W]`` of its position part."""
    b, rows = u.shape[0], u.shape[1] * u.shape[2]
    coef = torch.cat((u[..., :d], -u.sum(-1, keepdim=True)), -1).reshape(b, rows, d + 1).contiguous()
    per_axis = [torch.matmul(u[..., d:], t.T).reshape(b, rows, -1).contiguous() for t in tables]
    return coef, per_axis[0], per_axis[1]


def _weighted_features(acc: Tensor, t_y: Tensor, t_x: Tensor, d: int, tables: tuple[Tensor, Tensor]) -> Tensor:
    """Kernel sums → ``Σ w_n x̂_n`` ``[B, rows, C]``: data channels, positions through the tables, minus
    the ``Σ w μ/σ`` term on every channel."""
    pos = torch.matmul(t_y, tables[0]) + torch.matmul(t_x, tables[1])
    return torch.cat((acc[..., :d].float(), pos), -1) - acc[..., d:].float()


@torch.autocast("cpu", enabled=False)  # the kernel reads float32, also where the op runs inside autocast
def _forward(qf: Tensor, gamma: Tensor, beta: Tensor, grid: GridContext, eps: float,
             chunk_pixels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Folded queries ``qf [B, H, Q, C]`` (float32) → ``Σ_n p_n c_n [B, H, Q, C]`` with ``c = LayerNorm(γ, β)(context)``,
    and for the backward ``x̄ = Σ_n p_n x̂_n [B, H·Q, C]`` and the log-sum-exp ``[B, H·Q]``."""
    lib = _kernel()
    b, heads, n, c = qf.shape
    tables = tuple(t.to(torch.float32) for t in grid.tables)
    planes = _Planes(lib, grid, eps, chunk_pixels)
    d, rows, height, width = planes.d, heads * n, planes.height, planes.width
    coef, a_h, a_w = _coefficients(qf * gamma, d, tables)
    m = torch.full((b, rows), float("-inf"), dtype=torch.float32)  # the kernel's types, whatever the default dtype
    s = torch.zeros((b, rows), dtype=torch.float64)
    acc = torch.zeros((b, rows, d + 1), dtype=torch.float64)
    t_y, t_x = torch.zeros((b, rows, height), dtype=torch.float32), torch.zeros((b, rows, width), dtype=torch.float32)
    for i0, i1, buf in planes:
        pointers = (coef, a_h, a_w, buf, m, s, acc, t_y, t_x)
        if lib.perceivers_grid_attention(b, rows, height, width, d, i0, i1, *(t.data_ptr() for t in pointers)):
            raise MemoryError("the grid attention kernel could not allocate its row buffers")
    mean = _weighted_features(acc / s[..., None], t_y / s[..., None].float(), t_x / s[..., None].float(), d,
                              tables)  # x̄ = Σ p x̂  [B, rows, C]
    lse = (m.double() + torch.log(s)).float()
    return (gamma * mean + beta).reshape(b, heads, n, c), mean, lse


@torch.autocast("cpu", enabled=False)  # as _forward (a backward may run inside autocast)
def _backward(grad: Tensor, qf: Tensor, gamma: Tensor, mean: Tensor, lse: Tensor, grid: GridContext, eps: float,
              chunk_pixels: int, needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of :func:`_forward`'s output for ``qf``, ``γ`` and ``β`` (those ``needs`` asks for)."""
    lib = _kernel()
    b, heads, n, c = qf.shape
    tables = tuple(t.to(torch.float32) for t in grid.tables)
    g = grad.float().reshape(b, heads * n, c)
    planes = _Planes(lib, grid, eps, chunk_pixels)
    d, rows, height, width = planes.d, heads * n, planes.height, planes.width
    coef, a_h, a_w = _coefficients(qf * gamma, d, tables)  # as the forward's (recomputed: not worth keeping)
    v = g * gamma
    vcoef, b_h, b_w = _coefficients(v.reshape(b, heads, n, c), d, tables)
    centre = (v * mean).sum(-1).contiguous()  # v·x̄ per query
    acc = torch.zeros((b, rows, d + 1), dtype=torch.float64)
    t_y, t_x = torch.zeros((b, rows, height), dtype=torch.float32), torch.zeros((b, rows, width), dtype=torch.float32)
    for i0, i1, buf in planes:
        pointers = (coef, a_h, a_w, vcoef, b_h, b_w, lse, centre, buf, acc, t_y, t_x)
        if lib.perceivers_grid_attention_backward(b, rows, height, width, d, i0, i1,
                                                  *(t.data_ptr() for t in pointers)):
            raise MemoryError("the grid attention kernel could not allocate its row buffers")
    return _gradients(g, qf, gamma, mean, _weighted_features(acc, t_y, t_x, d, tables), needs)


def _gradients(g: Tensor, qf: Tensor, gamma: Tensor, mean: Tensor, dscore: Tensor,
               needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``qf``, ``γ`` and ``β`` that ``needs`` asks for, from the upstream gradient ``g``, ``x̄`` (``mean``)
    and ``Σ_n ds_n x̂_n`` (``dscore``), each ``[B, H·Q, C]``."""
    need_q, need_gamma, need_beta = needs
    return ((gamma * dscore).reshape(qf.shape) if need_q else None,
            (g * mean + qf.reshape(dscore.shape) * dscore).sum((0, 1)) if need_gamma else None,
            g.sum((0, 1)) if need_beta else None)


def _normalised_rows(grid: GridContext, eps: float, chunk_pixels: int):
    """The context's normalised rows ``x̂ [B, n, C]`` (LayerNorm without γ, β), chunks of whole image rows."""
    data, (t_h, t_w) = grid.data, grid.tables
    b, height, width = data.shape[0], *grid.shape
    step = max(1, chunk_pixels // (width * b))
    for i0 in range(0, height, step):
        pos = (t_h[i0 : i0 + step, None] + t_w[None]).float().expand(b, -1, -1, -1)
        x = torch.cat((data[:, i0 : i0 + step].float(), pos), -1).flatten(1, 2)
        yield F.layer_norm(x, x.shape[-1:], eps=eps)


def _forward_math(qf: Tensor, gamma: Tensor, beta: Tensor, grid: GridContext, eps: float,
                  chunk_pixels: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_forward` in PyTorch operations (an online softmax over :func:`_normalised_rows`; the scores, and so the
    log-sum-exp, without the term ``q·β`` that is the same for every key, as the kernel's): where the operator
    runs without the kernel (a program exported with it, run where the kernel is not built or off, or on another
    device)."""
    b, heads, n, c = qf.shape
    q = qf.reshape(b, heads * n, c).float()
    m = q.new_full((b, heads * n), float("-inf"))
    s, acc = q.new_zeros((b, heads * n)), q.new_zeros((b, heads * n, c))
    for x in _normalised_rows(grid, eps, chunk_pixels):
        scores = torch.matmul(q, (gamma * x).transpose(1, 2))  # [B, H·Q, n]; without q·β, as the kernel's
        m_new = torch.maximum(m, scores.amax(-1))
        p, rescale = torch.exp(scores - m_new[..., None]), torch.exp(m - m_new)
        s, acc, m = s * rescale + p.sum(-1), acc * rescale[..., None] + torch.matmul(p, x), m_new
    mean = acc / s[..., None]
    return (gamma * mean + beta).reshape(b, heads, n, c), mean, m + torch.log(s)


def _backward_math(grad: Tensor, qf: Tensor, gamma: Tensor, mean: Tensor, lse: Tensor, grid: GridContext, eps: float,
                   chunk_pixels: int, needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`_backward` in PyTorch operations (the score gradients ``p_n (v·x̂_n − v·x̄)`` chunk by chunk, see the
    module docstring)."""
    b, heads, n, c = qf.shape
    q, g = qf.reshape(b, heads * n, c).float(), grad.float().reshape(b, heads * n, c)
    v = g * gamma
    centre = (v * mean).sum(-1, keepdim=True)  # v·x̄
    dscore = torch.zeros_like(q)  # Σ ds_n x̂_n
    for x in _normalised_rows(grid, eps, chunk_pixels):
        p = torch.exp(torch.matmul(q, (gamma * x).transpose(1, 2)) - lse[..., None])
        dscore = dscore + torch.matmul(p * (torch.matmul(v, x.transpose(1, 2)) - centre), x)
    return _gradients(g, qf, gamma, mean, dscore, needs)


def _served(*tensors: Tensor) -> bool:
    """Whether the kernel takes an operator's tensors (built and on, CPU tensors)."""
    return all(t.device.type == "cpu" for t in tensors) and available()


class _GridAttention(torch.autograd.Function):
    """:func:`_forward` and :func:`_backward` for autograd (eager)."""

    @staticmethod
    def forward(ctx, qf: Tensor, gamma: Tensor, beta: Tensor, grid: GridContext, eps: float, chunk_pixels: int):
        qf, gamma, beta = qf.detach(), gamma.detach(), beta.detach()  # float32 (see applies)
        out, mean, lse = _forward(qf, gamma, beta, grid, eps, chunk_pixels)
        ctx.save_for_backward(qf, gamma, mean, lse)
        ctx.grid, ctx.eps, ctx.chunk_pixels = grid, eps, chunk_pixels
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        grads = _backward(grad, *ctx.saved_tensors, ctx.grid, ctx.eps, ctx.chunk_pixels, ctx.needs_input_grad[:3])
        return (*grads, None, None, None)


# Under ``torch.compile``: the same as operators (``torch.library``), which the compiled graph keeps as calls
# (traced, the Python loop over chunks of rows would be unrolled and the kernel replaced by the PyTorch path).
# The grid comes as its tensors: ``data [B, H, W, D]`` and the per-axis tables. Gradients not asked for come
# back empty.


def _grid(data: Tensor, t_h: Tensor, t_w: Tensor) -> GridContext:
    return GridContext(data, (data.shape[1], data.shape[2]), (t_h, t_w))


@torch.library.custom_op("perceivers::grid_attention", mutates_args=())
def _grid_op(qf: Tensor, gamma: Tensor, beta: Tensor, data: Tensor, t_h: Tensor, t_w: Tensor, eps: float,
             chunk_pixels: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_forward` as an operator (:func:`_forward_math` where the kernel is not served)."""
    forward = _forward if _served(qf, data) else _forward_math
    return forward(qf, gamma, beta, _grid(data, t_h, t_w), eps, chunk_pixels)


@_grid_op.register_fake
def _(qf, gamma, beta, data, t_h, t_w, eps, chunk_pixels):
    b, heads, n, c = qf.shape
    return qf.new_empty(b, heads, n, c), qf.new_empty(b, heads * n, c), qf.new_empty(b, heads * n)


@torch.library.custom_op("perceivers::grid_attention_backward", mutates_args=())
def _grid_backward_op(grad: Tensor, qf: Tensor, gamma: Tensor, mean: Tensor, lse: Tensor, data: Tensor, t_h: Tensor,
                      t_w: Tensor, eps: float, chunk_pixels: int, need_q: bool, need_gamma: bool,
                      need_beta: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_backward` as an operator (:func:`_backward_math` where the kernel is not served)."""
    grid, needs = _grid(data, t_h, t_w), (need_q, need_gamma, need_beta)
    if _served(qf, data):
        grads = _backward(grad, qf, gamma, mean, lse, grid, eps, chunk_pixels, needs)
    else:
        grads = _backward_math(grad, qf, gamma, mean, lse, grid, eps, chunk_pixels, needs)
    return tuple(qf.new_empty(0) if g is None else g for g in grads)


@_grid_backward_op.register_fake
def _(grad, qf, gamma, mean, lse, data, t_h, t_w, eps, chunk_pixels, need_q, need_gamma, need_beta):
    return tuple(torch.empty_like(t) if need else qf.new_empty(0)
                 for t, need in zip((qf, gamma, gamma), (need_q, need_gamma, need_beta)))


def _grid_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
    qf, gamma, _, data, t_h, t_w, eps, chunk_pixels = inputs
    ctx.save_for_backward(qf, gamma, output[1], output[2], data, t_h, t_w)
    ctx.eps, ctx.chunk_pixels = eps, chunk_pixels


def _grid_op_backward(ctx, grad: Tensor, _dmean: Tensor | None, _dlse: Tensor | None):
    needs = ctx.needs_input_grad[:3]
    grads = _grid_backward_op(grad, *ctx.saved_tensors, ctx.eps, ctx.chunk_pixels, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


_grid_op.register_autograd(_grid_op_backward, setup_context=_grid_setup)
