"""Attention over heads wider than CUDA's flash and cuDNN kernels take (d > 256): forward + backward per variant.

    python benchmarks/wide_heads.py                      # every variant (CUDA only)
    python benchmarks/wide_heads.py sdpa,grouped         # a few

The shapes are the official vision model's folded cross-attention (one 264-wide head: RGB and 64 Fourier bands,
padded; 512 latents over 224² pixels) at batch 64 and 16. Each line gives the median time of 8 calls, the
products' rate, the peak memory above the inputs, and the relative error of the output and of each gradient
against SDPA's math path in float32 on two samples. Results: benchmarks/results/wide-attention-h100.txt.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from perceivers.layers import wide_attention

DEV = "cuda"


def sdpa(q, k, v):
    """SDPA as the models called it: past 256 channels, its memory-efficient kernel."""
    return F.scaled_dot_product_attention(q, k, v)


def math(q, k, v):
    """SDPA's math path (the reference, in float32)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def written_bf16(q, k, v):
    """Written out: bf16 scores, softmax into float32, bf16 weighted sum; autograd keeps the whole score matrix."""
    w = torch.softmax(torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)), -1, dtype=torch.float32)
    return torch.matmul(w.to(q.dtype), v)


def chunked_fp32(q, k, v, chunk=8192):
    """Keys in chunks, each normalised in float32, merged by their log-sum-exps."""
    outs, lses = [], []
    for i in range(0, k.shape[2], chunk):
        sc = torch.matmul(q * q.shape[-1] ** -0.5, k[:, :, i:i + chunk].transpose(-1, -2)).float()
        lse = torch.logsumexp(sc, -1, keepdim=True)
        outs.append(torch.matmul(torch.exp(sc - lse).to(q.dtype), v[:, :, i:i + chunk]).float())
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), 0)
    return (torch.stack(outs) * weights).sum(0).to(q.dtype)


VARIANTS = {"sdpa": sdpa, "math": math, "written_bf16": written_bf16, "chunked_fp32": chunked_fp32,
            "written_bf16_compiled": torch.compile(written_bf16), "chunked_fp32_compiled": torch.compile(chunked_fp32),
            "grouped": wide_attention.attend, "grouped_compiled": torch.compile(wide_attention.attend)}


def run(fn, q, k, v, g):
    out = fn(q, k, v)
    out.backward(g)
    return out


def timed(fn, *args, n=8) -> float:
    """Median milliseconds of ``n`` forward + backward calls, timed with CUDA events after two warm-ups."""
    for _ in range(2):
        run(fn, *args)
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(fn, *args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("wide_heads.py: error: expected a CUDA device, found none")
    torch.backends.cuda.matmul.allow_tf32 = False
    chosen = {k: VARIANTS[k] for k in sys.argv[1].split(",")} if len(sys.argv) > 1 else VARIANTS
    for b, h, m, n, d in [(64, 1, 512, 50176, 264), (16, 1, 512, 50176, 264)]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, rows, d, device=DEV).to(torch.bfloat16).requires_grad_() for rows in (m, n, n))
        g = torch.randn(b, h, m, d, device=DEV, dtype=torch.bfloat16)
        # the reference: two samples in float32 through SDPA's math path
        qs, ks, vs = (t[:2].detach().float().requires_grad_() for t in (q, k, v))
        ref = math(qs, ks, vs)
        ref.backward(g[:2].float())
        flops = 3 * 4 * b * h * m * n * d  # two products forward, four backward (recomputation not counted)
        print(f"shape B{b} H{h} Q{m} K{n} D{d}  fwd+bwd GEMM FLOPs {flops / 1e12:.2f} T", flush=True)
        for name, fn in chosen.items():
            try:
                qq, kk, vv = (t[:2].detach().clone().requires_grad_() for t in (q, k, v))
                out = run(fn, qq, kk, vv, g[:2])
                err = (rel(out, ref), rel(qq.grad, qs.grad), rel(kk.grad, ks.grad), rel(vv.grad, vs.grad))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = timed(fn, q, k, v, g)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                print(f"  {name:24s} {ms:8.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  peak {peak:6.2f} GiB  "
                      f"err out {err[0]:.1e} dq {err[1]:.1e} dk {err[2]:.1e} dv {err[3]:.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001 - one variant failing (e.g. under compile) must not end the run
                print(f"  {name:24s} failed: {type(exc).__name__}: {str(exc)[:150]}", flush=True)
            for t in (q, k, v):
                t.grad = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
