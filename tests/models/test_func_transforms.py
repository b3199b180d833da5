"""``torch.func`` over the models outside the reliability zoo (tests/reliability covers the perceiver-pytorch
family, the variants, the fork's multi-modality model and the DeepMind task models): per-sample gradients with
``vmap(grad(loss))`` equal each sample's own backward pass, and ``jvp`` gives ``jacrev``'s tangent."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

import perceivers
import perceivers.flash_perceiver as fp
from perceivers.models.patch import PatchPerceiver
from perceivers.models.perceiver_ar import CausalLanguageModel, CausalLanguageModelConfig
from perceivers.perceiver_ar_pytorch import PerceiverAR

HEADS = {"latent_dim": 16, "num_latents": 4, "cross_heads": 2, "cross_head_dim": 8, "latent_heads": 2,
         "latent_head_dim": 8}
MODELS = {
    "flash": (lambda: fp.Perceiver(input_dim=6, depth=2, output_dim=3, latent_rotary_emb_dim=4, **HEADS),
              lambda: torch.randn(3, 7, 6), {}),
    "flash-io": (lambda: fp.PerceiverIO(input_dim=6, query_dim=5, depth=1, query_heads=1, query_head_dim=8, proj_dim=3,
                                        **HEADS), lambda: torch.randn(3, 7, 6), {"queries": torch.ones(1, 2, 5)}),
    "patch": (lambda: PatchPerceiver(image_size=8, patch_size=2, input_channels=3, num_classes=5, num_latents=4,
                                     latent_dim=16, latent_heads=2, latent_dim_head=8, num_blocks=2, num_iterations=2),
              lambda: torch.randn(3, 8, 8, 3), {}),
    "causal-lm": (lambda: CausalLanguageModel(CausalLanguageModelConfig(
        vocab_size=20, max_seq_len=16, num_latents=6, num_channels=16, num_heads=2, num_self_attention_layers=2)),
        lambda: torch.randint(0, 20, (3, 12)), {}),
    "perceiver-ar": (lambda: PerceiverAR(num_tokens=20, dim=64, depth=2, max_seq_len=16, cross_attn_seq_len=10,
                                         dim_head=32, heads=2), lambda: torch.randint(0, 20, (3, 16)), {}),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_gradients(name):
    build, data, kwargs = MODELS[name]
    torch.manual_seed(0)
    model, x = build().eval(), data()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(params, sample):
        return _logits(functional_call(model, params, (sample[None],), kwargs)).float().square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        _logits(model(x[i: i + 1], **kwargs)).float().square().sum().backward()
        for key, p in model.named_parameters():
            want = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(per_sample[key][i], want, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_forward_mode_and_jacobians():
    """A float32 Perceiver whose heads the native kernels take (64 and 16 wide) in eager mode: ``jvp`` and
    ``jacrev`` run on operators that define them, and give the Jacobian of eager reverse mode (the native
    kernels' backward)."""
    torch.manual_seed(0)
    model = perceivers.Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=10.0, depth=2,
                                 num_latents=8, latent_dim=64, cross_heads=1, latent_heads=4, cross_dim_head=64,
                                 latent_dim_head=16, num_classes=5).eval()
    x, t = torch.randn(1, 6, 5, 3), torch.randn(1, 6, 5, 3)
    out, tangent = jvp(model, (x,), (t,))
    torch.testing.assert_close(out, model(x))
    jacobian = jacrev(model)(x)  # [1, 5, 1, 6, 5, 3]
    eager = torch.autograd.functional.jacobian(model, x)  # one backward per output, outside any transform
    torch.testing.assert_close(jacobian, eager, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tangent, torch.einsum("boxhwc,xhwc->bo", eager, t), rtol=1e-4, atol=1e-6)
