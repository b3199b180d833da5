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
this module prepares its inputs and assembles the output. Inference only (no autograd); anything it
does not cover returns ``None`` and the caller takes its PyTorch path.
"""

from __future__ import annotations

import ctypes

import torch
from einops import rearrange
from torch import Tensor, nn

from .. import kernels
from .stream import GridContext

__all__ = ["applies", "available", "grid_cross_attention", "serves"]

# Pixels per kernel call: their planes (5 floats each for RGB: 1.3 MiB) stay in the caches.
GRID_CHUNK = 1 << 16


def _kernel():
    lib = kernels.load("grid_attention")
    if lib is None:
        return None
    if lib.perceivers_grid_attention.argtypes is None:
        lib.perceivers_grid_attention.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 9
        lib.perceivers_grid_attention.restype = ctypes.c_int
        lib.perceivers_grid_planes.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 5 + [
            ctypes.c_double, ctypes.c_void_p]
        lib.perceivers_grid_planes.restype = None
    return lib


def available() -> bool:
    """Whether the native kernel is built and enabled (``PERCEIVERS_NATIVE``)."""
    return _kernel() is not None


def serves(data: Tensor, *, grad: bool, masked: bool) -> bool:
    """Whether a grid context built from ``data`` would go through the kernel: float32 CPU inference
    without a key mask, not compiling (models use it to give small images as a one-chunk stream)."""
    return (
        not grad and not masked and data.device.type == "cpu" and data.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
        and not torch.jit.is_scripting() and available()
    )


def applies(attn: nn.Module, norm: nn.Module, x: Tensor, grid: GridContext, mask: Tensor | None) -> bool:
    """Whether :func:`grid_cross_attention` handles this call (see :func:`serves`; a folding
    ``attn`` behind a ``LayerNorm`` over the grid's channels, float32 queries)."""
    grad = torch.is_grad_enabled() and (
        x.requires_grad or grid.data.requires_grad or any(p.requires_grad for p in attn.parameters())
        or any(p.requires_grad for p in norm.parameters())
    )
    return (
        attn.fold_kv is not False
        and not (attn.training and attn.dropout)
        and isinstance(norm, nn.LayerNorm)
        and tuple(norm.normalized_shape) == (attn.kv_dim,)
        and grid.channels == attn.kv_dim
        and x.device.type == "cpu" and x.dtype == torch.float32
        and serves(grid.data, grad=grad, masked=mask is not None)
    )


@torch.no_grad()
def grid_cross_attention(
    attn: nn.Module, norm: nn.LayerNorm, x: Tensor, grid: GridContext, *, query_mask: Tensor | None = None,
    chunk_pixels: int = GRID_CHUNK,
) -> Tensor:
    """``attn(x, norm(context))`` for queries ``x [B, Q, q_dim]`` (already normalised) → ``[B, Q, out_dim]``.

    Call only when :func:`applies`. The grid is processed in chunks of whole image rows of about
    ``chunk_pixels`` pixels (their planes, ``D + 2`` floats per pixel, are all that is built).
    """
    lib = _kernel()
    b, d = grid.data.shape[0], grid.data.shape[-1]
    height, width = grid.shape
    rows_per_chunk = max(1, chunk_pixels // width)
    t_h, t_w = (t.to(torch.float32) for t in grid.tables)
    c = d + t_h.shape[-1]
    heads = attn.num_heads

    q = rearrange(attn.to_q(x), "b n (h e) -> b h n e", h=heads) * (attn.qk_channels // heads) ** -0.5
    qf = attn._fold_queries(q)  # [B, H, Q, C]
    gamma = norm.weight if norm.weight is not None else torch.ones(c)
    beta = norm.bias if norm.bias is not None else torch.zeros(c)
    u = qf * gamma
    u_pos = u[..., d:]
    rows = heads * x.shape[1]
    coef = torch.cat((u[..., :d], -u.sum(-1, keepdim=True)), -1).reshape(b, rows, d + 1).contiguous()
    a_h = torch.matmul(u_pos, t_h.T).reshape(b, rows, height).contiguous()
    a_w = torch.matmul(u_pos, t_w.T).reshape(b, rows, width).contiguous()

    m = torch.full((b, rows), float("-inf"))
    s = torch.zeros((b, rows), dtype=torch.float64)
    acc = torch.zeros((b, rows, d + 1), dtype=torch.float64)
    t_y = torch.zeros((b, rows, height))
    t_x = torch.zeros((b, rows, width))

    # LayerNorm statistics per pixel separate like the features: per-axis sums and sums of squares
    t_h64, t_w64 = t_h.double(), t_w.double()
    sums = [t.sum(-1).contiguous() for t in (t_h64, t_w64)]
    squares = [(t * t).sum(-1).contiguous() for t in (t_h64, t_w64)]
    planes = torch.empty((d + 2, min(height, rows_per_chunk) * width))
    for i0 in range(0, height, rows_per_chunk):
        i1 = min(height, i0 + rows_per_chunk)
        n = (i1 - i0) * width
        for bi in range(b):
            data = grid.data[bi, i0:i1].reshape(n, d).contiguous()  # a view of contiguous inputs
            lib.perceivers_grid_planes(
                n, width, d, c, i0, data.data_ptr(), sums[0].data_ptr(), squares[0].data_ptr(),
                sums[1].data_ptr(), squares[1].data_ptr(), float(norm.eps), planes.data_ptr(),
            )
            pointers = (coef[bi], a_h[bi], a_w[bi], planes, m[bi], s[bi], acc[bi], t_y[bi], t_x[bi])
            if lib.perceivers_grid_attention(rows, height, width, d, i0, i1, *(t.data_ptr() for t in pointers)):
                raise MemoryError("the grid attention kernel could not allocate its row buffers")

    # Σ p x/σ per channel and Σ p μ/σ, then the weighted sum of the normalised context
    total = s[..., None]
    mean_data = (acc[..., :d] / total).float()
    mean_mu = (acc[..., d:] / total).float()
    mean_pos = (torch.matmul(t_y, t_h) + torch.matmul(t_x, t_w)) / total.float()
    weighted = gamma * (torch.cat((mean_data, mean_pos), -1) - mean_mu) + beta  # [B, rows, C]
    out = attn._unfold_values(weighted.reshape(b, heads, x.shape[1], c))
    if query_mask is not None:
        out = out * query_mask[:, None, :, None].to(out.dtype)
    return attn.to_out(rearrange(out, "b h n e -> b n (h e)"))

