"""Streamed attention (``Attention.forward_chunked``) gives the gradients of whole attention when only the context
needs them: a frozen model explaining its input (saliency, adversarial inputs), or a trainable preprocessor under a
frozen encoder. Without autograd on the attention's own side it took aten's fused kernel per chunk, whose gradient
ignores the log-sum-exp that weights the chunks' merge: the context's gradient was off by 5% (relative to its
largest entry)."""

import torch

from perceivers import Perceiver
from perceivers.layers import Attention


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_frozen_attention_streams_the_context_gradient():
    torch.manual_seed(0)
    attn = Attention(8, 6, num_heads=2, qk_channels=16).requires_grad_(False)
    attn.fold_kv = False
    x = torch.randn(2, 4, 8)
    context = torch.randn(2, 64, 6, requires_grad=True)
    streamed = attn.forward_chunked(x, lambda a, b: context[:, a:b], 64, chunk_size=16)
    (grad,) = torch.autograd.grad(streamed.square().sum(), context)
    whole = attn(x, context)
    (expected,) = torch.autograd.grad(whole.square().sum(), context)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-6)
    assert _rel(grad, expected) < 1e-5  # was 0.05


def test_frozen_perceiver_streamed_input_gradient():
    torch.manual_seed(0)
    kw = {"input_channels": 3, "input_axis": 2, "num_freq_bands": 2, "max_freq": 8.0, "depth": 1, "num_classes": 3,
          "num_latents": 4, "latent_dim": 16, "cross_heads": 1, "latent_heads": 2, "cross_dim_head": 16,
          "latent_dim_head": 8}
    streamed = Perceiver(**kw, chunk_size=16).eval().requires_grad_(False)
    whole = Perceiver(**kw, chunk_size=0).eval().requires_grad_(False)
    whole.load_state_dict(streamed.state_dict())
    image = torch.randn(2, 8, 8, 3)
    grads = []
    for model in (streamed, whole):
        x = image.clone().requires_grad_(True)
        model(x).square().sum().backward()
        grads.append(x.grad)
    assert _rel(*grads) < 1e-5
