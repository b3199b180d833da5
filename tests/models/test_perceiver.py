"""Perceiver and PerceiverBlock: shapes, options, tying, resolutions, dtypes, per-sample positions."""

from __future__ import annotations

import copy

import pytest
import torch

from perceivers import Perceiver, PerceiverBlock
from perceivers.layers import linear_positions

KW = {
    "num_freq_bands": 3,
    "depth": 3,
    "max_freq": 8.0,
    "input_channels": 3,
    "input_axis": 2,
    "num_latents": 6,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
    "num_classes": 5,
}


def make(**overrides) -> Perceiver:
    return Perceiver(**{**KW, **overrides}).eval()


@pytest.mark.parametrize(("input_axis", "axes"), [(1, (7,)), (2, (5, 4)), (3, (3, 2, 4))])
def test_output_shapes(input_axis, axes):
    model = make(input_axis=input_axis, input_channels=2)
    x = torch.randn(2, *axes, 2)
    assert model(x).shape == (2, 5)
    assert model(x, return_embeddings=True).shape == (2, 6, 16)
    assert model.context_dim == 2 + input_axis * (2 * 3 + 1)


def test_no_classifier_head_returns_latents():
    model = make(final_classifier_head=False)
    assert model(torch.randn(2, 5, 4, 3)).shape == (2, 6, 16)
    assert isinstance(model.head, torch.nn.Identity)


def test_return_hiddens():
    model = make(self_per_cross_attn=2)
    out, hiddens = model(torch.randn(2, 5, 4, 3), return_hiddens=True)
    assert out.shape == (2, 5)
    assert len(hiddens) == KW["depth"] + 1
    assert all(h.shape == (2, 6, 16) for h in hiddens)
    torch.testing.assert_close(hiddens[0], model.latents.expand(2, -1, -1))
    emb = model(torch.randn(2, 5, 4, 3), return_embeddings=True)
    assert emb.shape == hiddens[-1].shape


def test_block_outputs_seed_the_attention_residual():
    model = make(attn_residual=True, attn_residual_rank=4)
    x = torch.randn(2, 5, 4, 3)
    seed = torch.randn(2, 6, 16)
    out, hiddens = model(x, block_outputs=seed, return_hiddens=True)
    assert len(hiddens) == KW["depth"] + 1 and hiddens[0] is seed
    out_list, _ = model(x, block_outputs=[seed], return_hiddens=True)
    torch.testing.assert_close(out, out_list)
    assert not torch.allclose(out, model(x))  # the seed replaces the initial latents in the pool


@pytest.mark.parametrize("self_per_cross_attn", [1, 2])
def test_weight_tying_schedule(self_per_cross_attn):
    tied = make(weight_tie_layers=True, depth=4, self_per_cross_attn=self_per_cross_attn)
    untied = make(depth=4, self_per_cross_attn=self_per_cross_attn)
    assert tied.block_order == (0, 1, 1, 1) and len(tied.blocks) == 2
    assert untied.block_order == (0, 1, 2, 3) and len(untied.blocks) == 4
    layers = tied.layers
    assert len(layers) == 4 and layers[1] is layers[2] is layers[3] and layers[0] is not layers[1]
    # the self-attentions inside one block stay distinct
    if self_per_cross_attn == 2:
        assert layers[1].self_attns[0] is not layers[1].self_attns[1]
    # no tensor is stored twice
    ptrs = [t.data_ptr() for t in tied.state_dict().values()]
    assert len(ptrs) == len(set(ptrs))


def test_tied_model_equals_untied_model_with_copied_blocks():
    """Tied steps reuse one projection of the input (kv cache); the result is that of repeated blocks."""
    tied = make(weight_tie_layers=True, depth=4)
    untied = make(depth=4)
    with torch.no_grad():
        untied.latents.copy_(tied.latents)
        untied.head.load_state_dict(tied.head.state_dict())
        for step, unique in enumerate(tied.block_order):
            untied.blocks[step].load_state_dict(tied.blocks[unique].state_dict())
    x = torch.randn(2, 5, 4, 3)
    mask = torch.rand(2, 5, 4) > 0.3
    torch.testing.assert_close(tied(x, mask=mask), untied(x, mask=mask))


def test_any_resolution_at_run_time():
    model = make()
    for shape in [(4, 4), (6, 5), (1, 9)]:
        assert model(torch.randn(1, *shape, 3)).shape == (1, 5)
    x = torch.randn(2, 6, 5, 3)
    torch.testing.assert_close(model(x), model(x))  # cached features give the same result


def test_fourier_features_follow_the_perceiver_pytorch_layout():
    """Per axis [sin(π x f_1..K), cos(π x f_1..K), x] after the data channels, f = linspace(1, μ/2, K)."""
    model = make(input_axis=1, input_channels=1)
    ctx = model.build_context(torch.zeros(1, 5, 1))
    x = torch.linspace(-1, 1, 5)
    freqs = torch.linspace(1.0, 4.0, 3)
    expected = torch.cat(
        [(torch.pi * x[:, None] * freqs).sin(), (torch.pi * x[:, None] * freqs).cos(), x[:, None]], -1
    )
    torch.testing.assert_close(ctx[0, :, 1:], expected)
    assert torch.all(ctx[0, :, 0] == 0)


def test_per_sample_positions_match_the_grid():
    model = make()
    x = torch.randn(2, 5, 4, 3)
    pos = linear_positions((5, 4)).reshape(1, 20, 2).expand(2, -1, -1)
    torch.testing.assert_close(model(x.reshape(2, 20, 3), pos=pos), model(x))


def test_dropout_only_in_training():
    model = make(attn_dropout=0.5, ff_dropout=0.5)
    x = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_every_parameter_gets_a_gradient():
    model = make(self_per_cross_attn=2, attn_residual=True, attn_residual_rank=4)
    model(torch.randn(2, 5, 4, 3), mask=torch.rand(2, 5, 4) > 0.3).sum().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    model = make()
    x = torch.randn(2, 5, 4, 3)
    mask = torch.rand(2, 5, 4) > 0.3
    ref = model(x, mask=mask)
    low = copy.deepcopy(model).to(dtype)
    out = low(x.to(dtype), mask=mask)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 0.1 * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)


def test_block_without_cross_attention_ignores_context():
    block = PerceiverBlock(dim=16, latent_heads=2, latent_dim_head=8, has_cross_attn=False).eval()
    x = torch.randn(2, 5, 16)
    assert block.cross_attn is None
    torch.testing.assert_close(block(x), block(x, context=torch.randn(2, 3, 16)))
    with pytest.raises(ValueError, match="no cross-attention"):
        block.project_kv(torch.randn(2, 3, 16))


def test_block_queries_contribute_kv_attend_to_themselves():
    """With queries_contribute_kv and every context key masked, latents still attend to each other."""
    block = PerceiverBlock(
        dim=16, latent_heads=2, cross_dim_head=8, latent_dim_head=8, queries_contribute_kv=True
    )
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    none = torch.zeros(2, 7, dtype=torch.bool)
    a = block(x, context=ctx, mask=none)
    b = block(x, context=torch.randn(2, 7, 16), mask=none)
    torch.testing.assert_close(a, b)
    plain = PerceiverBlock(dim=16, latent_heads=2, cross_dim_head=8, latent_dim_head=8)
    plain.load_state_dict(block.state_dict())
    assert not torch.allclose(plain(x, context=ctx), block(x, context=ctx))


def test_layers_is_a_module_list_of_the_schedule():
    model = Perceiver(num_freq_bands=2, depth=3, max_freq=4.0, num_latents=4, latent_dim=8,
                      latent_heads=2, latent_dim_head=4, cross_dim_head=8, num_classes=3,
                      weight_tie_layers=True)
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 3
    assert model.layers[1] is model.layers[2] is model.blocks[1]
    assert {id(p) for p in model.layers.parameters()} == {id(p) for p in model.blocks.parameters()}
