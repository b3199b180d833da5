"""Reference attention for the kernel tests: heads laid out as the layers lay them out, and softmax
attention written out in float64 (or another dtype)."""

import torch


def heads(b, h, n, d, generator, *, layout="projection"):
    """``[B, H, N, d]`` laid out as a projection's output is (``[B, N, H, d]`` permuted), contiguous, or
    one head's tensor shared by every head (an expanded view, as the folded cross-attention's context)."""
    if layout == "shared":
        return torch.randn(b, 1, n, d, generator=generator).expand(b, h, n, d)
    if layout == "contiguous":
        return torch.randn(b, h, n, d, generator=generator)
    return torch.randn(b, n, h, d, generator=generator).transpose(1, 2)


def reference(q, k, v, mask, scale, grad, dtype=torch.float64):
    """Values and the gradients of ``q, k, v`` written out, computed in ``dtype`` (float64: the reference;
    bfloat16: the peers' bf16 attention), returned in float64."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    out.backward(grad.to(dtype))
    return tuple(t.double() for t in (out, q.grad, k.grad, v.grad))
