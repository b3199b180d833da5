"""perceivers.flash_perceiver without the reference: errors, masks, dtypes, tying, weights, compile, utilities.

(Parity with the real FlashPerceiver is tests/parity/test_flash_perceiver.py.)
"""

from __future__ import annotations

import pytest
import torch

import perceivers
from perceivers import flash_perceiver as fp

SMALL = {"num_latents": 4, "latent_dim": 16, "cross_heads": 2, "cross_head_dim": 8, "latent_heads": 2,
         "latent_head_dim": 8}


def _model(**kwargs) -> fp.Perceiver:
    torch.manual_seed(0)
    return fp.Perceiver(**{**SMALL, "input_dim": 6, "depth": 2, **kwargs}).eval()


def _data(b: int = 2, n: int = 5, d: int = 6) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(1))


def test_top_level_names_and_defaults():
    assert perceivers.FlashPerceiver is fp.Perceiver and perceivers.FlashPerceiverIO is fp.PerceiverIO
    model = fp.Perceiver(input_dim=3, depth=1, latent_dim=32, num_latents=4, output_dim=2)
    assert model.output_mode == "average" and model.use_flash_attn
    assert (model.cross_heads, model.cross_head_dim, model.latent_heads, model.latent_head_dim) == (1, 64, 8, 64)
    assert model.layers[0][0].mlp.fc1.out_features == 2 * 128  # latent_dim * 4 rounded up to 128, gated


def test_mean_is_an_alias_of_average():
    ours, alias = _model(output_dim=3), _model(output_dim=3, output_mode="mean")
    assert alias.output_mode == "average"
    x = _data()
    torch.testing.assert_close(ours(x), alias(x))
    torch.testing.assert_close(ours(x), ours.out_proj(ours(x, return_embeddings=True).mean(1)))


@pytest.mark.parametrize(
    ("build", "call", "error", "match"),
    [
        ({}, {"data": torch.zeros(2, 5, 7)}, ValueError, "has 7 features, expected input_dim 6"),
        ({}, {"data": torch.zeros(2, 6)}, ValueError, r"must be \[batch, tokens, 6\], got \(2, 6\)"),
        ({}, {"data": [torch.zeros(2, 5, 6)]}, ValueError, "expected 2 inputs .* got 1"),
        ({"input_dim": [6, 3]}, {"data": [torch.zeros(2, 5, 6), torch.zeros(2, 4, 3)], "mask": torch.ones(2, 5).bool()},
         TypeError, "mask must be a list"),
        ({"input_dim": [6, 3]}, {"data": [torch.zeros(2, 5, 6), torch.zeros(2, 4, 3)], "mask": [None]},
         ValueError, "expected 2 masks"),
        ({"input_dim": [6, 3]}, {"data": [torch.zeros(2, 5, 6), torch.zeros(3, 4, 3)]}, ValueError, "same batch size"),
        ({}, {"data": torch.zeros(2, 5, 6), "mask": torch.ones(2, 4).bool()}, ValueError, r"mask must have shape"),
        ({}, {"data": torch.zeros(2, 5, 6), "mask": torch.ones(2, 5)}, ValueError, "dtype torch.bool"),
        ({}, {"data": torch.zeros(2, 5, 6), "latents": torch.zeros(4, 8)}, ValueError, "latent_dim 16"),
        ({}, {"data": torch.zeros(2, 5, 6), "latents": torch.zeros(3, 4, 16)}, ValueError, "batch size 3"),
        ({"num_latents": None}, {"data": torch.zeros(2, 5, 6)}, ValueError, "num_latents=None: pass latents"),
        ({"output_dim": 2, "output_mode": "concat"}, {"data": torch.zeros(2, 5, 6), "latents": torch.zeros(3, 16)},
         ValueError, "built for 4 latents, got 3"),
    ],
)
def test_bad_input_is_named(build, call, error, match):
    with pytest.raises(error, match=match):
        _model(**build)(**call)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_dim": [6, 6, 6]}, ValueError, "expected 2 .depth., got 3"),
        ({"input_dim": [6, 6], "weight_tie_layers": True}, ValueError, "single input_dim"),
        ({"cross_rotary_emb_dim": 4}, NotImplementedError, "cross-attention are not supported"),
        ({"latent_rotary_emb_dim": 3}, ValueError, r"even and in \[0, 8\]"),
        ({"latent_rotary_emb_dim": 10}, ValueError, r"even and in \[0, 8\]"),
        ({"output_mode": "max"}, ValueError, "'average' .alias 'mean'., 'concat' or 'first', got 'max'"),
        ({"output_mode": "concat", "latent_drop": 0.5}, ValueError, "latent_drop"),
        ({"output_mode": "concat", "output_dim": 2, "num_latents": None}, ValueError, "needs num_latents"),
        ({"latent_drop": 1.0}, ValueError, r"latent_drop must be in \[0, 1\)"),
        ({"cross_heads": None, "cross_head_dim": None}, ValueError, "both are None"),
    ],
)
def test_bad_configuration_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        _model(**kwargs)


def test_perceiver_io_refusals_and_query_checks():
    io = fp.PerceiverIO(**SMALL, input_dim=6, query_dim=10, depth=1)
    x = _data()
    with pytest.raises(NotImplementedError, match="query_mask is not supported"):
        io(x, queries=torch.zeros(3, 10), query_mask=torch.ones(2, 3).bool())
    with pytest.raises(ValueError, match="query_dim 10"):
        io(x, queries=torch.zeros(3, 9))
    with pytest.raises(NotImplementedError, match="query cross-attention"):
        fp.PerceiverIO(**SMALL, input_dim=6, query_dim=10, depth=1, query_rotary_emb_dim=2)
    assert io(x).shape == (2, 4, 16)  # no queries: the latents
    assert io(x, queries=torch.zeros(3, 10)).shape == (2, 3, 10)


def test_masked_tokens_do_not_matter_and_fully_masked_samples_stay_finite():
    model = _model(latent_rotary_emb_dim=4)
    x = _data(3, 6)
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 0])[:, None]
    changed = x.clone()
    changed[~mask] = 100.0
    out = model(x, mask=mask)
    torch.testing.assert_close(model(changed, mask=mask)[:2], out[:2])
    assert torch.isfinite(out).all()
    # a sample without any valid key attends all of them evenly (as FlashPerceiver does)
    torch.testing.assert_close(out[2], model(x[2:])[0])


def test_single_input_uses_the_first_layers_zero_tokens_list_inputs_their_own():
    model = _model(num_zero_tokens=2)
    x = _data()
    before_single, before_list = model(x), model([x, x])
    with torch.no_grad():
        model.zero_tokens[1].add_(1.0)
    torch.testing.assert_close(model(x), before_single)  # as FlashPerceiver: context built once, at layer 0
    assert not torch.allclose(model([x, x]), before_list)


def test_weight_tying_shares_layers_after_the_first():
    tied, untied = _model(depth=3, weight_tie_layers=True), _model(depth=3)
    assert tied.layers[1][0] is tied.layers[2][0] and tied.layers[1][1][0] is tied.layers[2][1][0]
    assert tied.layers[0][0] is not tied.layers[1][0]
    assert fp.numel(tied) < fp.numel(untied)
    assert list(tied.state_dict()) == list(untied.state_dict())


def test_attention_weights_and_set_flash_attn():
    model = _model(num_zero_tokens=1, self_per_cross_attn=2)
    x, mask = _data(), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    model.set_flash_attn(False)
    assert model.use_flash_attn is False
    out, weights = model(x, mask=mask, return_attn_weights=True)
    torch.testing.assert_close(out, model(x, mask=mask))  # the weights path gives the SDPA output
    assert len(weights) == model.num_attention_layers == 6
    assert [tuple(w.shape) for w in weights[:2]] == [(2, 2, 4, 6), (2, 2, 4, 4)]  # zero token counted
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 2, 4))
    assert (weights[0][0, :, :, 4:] == 0).all()  # the masked keys (1 zero token + 3 valid first)


@pytest.mark.parametrize("cls", ["Perceiver", "PerceiverIO"])
def test_backward_fp32_and_bf16_autocast_on_cpu(cls):
    torch.manual_seed(0)
    if cls == "Perceiver":
        model = fp.Perceiver(**SMALL, input_dim=[6, 3], depth=2, output_dim=3, latent_drop=0.25,
                             latent_rotary_emb_dim=4, num_zero_tokens=2)
        args = ([_data(), torch.randn(2, 3, 3)],)
    else:
        model = fp.PerceiverIO(**SMALL, input_dim=6, query_dim=8, depth=2, proj_dim=3, gated_mlp=False)
        args = (_data(),)
    kwargs = {} if cls == "Perceiver" else {"queries": torch.randn(5, 8)}
    out = model(*args, **kwargs)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.eval()(*args, **kwargs)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), model(*args, **kwargs), atol=0.1, rtol=0.1)


def test_latent_drop_only_in_training():
    model = _model(num_latents=8, latent_drop=0.3)
    x = _data()
    assert model(x).shape == (2, 8, 16)
    assert model.train()(x).shape == (2, 5, 16)  # int(0.7 * 8)


def test_compiles_without_graph_breaks():
    model = _model(output_dim=3, latent_rotary_emb_dim=4, num_zero_tokens=1)
    x, mask = _data(), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, mask=mask), model(x, mask=mask))


def test_image_adapter_and_encodings():
    enc = fp.get_encoder("nerf", 2, num_frequency_bands=3)
    assert enc.in_dim == 2 and enc.out_dim == 12
    adapter = fp.ImageAdapter(embed_dim=8, num_channels=3, pos_encoding=enc, patch_size=2)  # int: square patches
    assert adapter.patch_dim == 2 * 2 * 3 + 12
    assert adapter(torch.randn(2, 3, 4, 6)).shape == (2, 6, 8)
    assert adapter(torch.randn(1, 3, 2, 2)).shape == (1, 1, 8)  # another size: its own grid
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        adapter(torch.randn(1, 3, 3, 4))
    with pytest.raises(ValueError, match="expected 3 channels, got 4"):
        adapter(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown encoder 'fourier'"):
        fp.get_encoder("fourier", 2)
    gauss = fp.GaussianFourierFeatureTransform(2, 4, seed=0)
    copy = fp.GaussianFourierFeatureTransform.from_proj_matrix(gauss.proj_matrix)
    assert torch.equal(copy.proj_matrix, gauss.proj_matrix) and list(copy.state_dict()) == ["proj_matrix"]
    trainable = fp.FourierPositionalEncoding(torch.randn(2, 5), is_trainable=True)
    assert [n for n, _ in trainable.named_parameters()] == ["proj_matrix"]
    with pytest.raises(ValueError, match="expected 2 input channels, got 3"):
        trainable(torch.zeros(4, 3))


def test_a_model_cast_to_bfloat16_runs_with_float32_rotary_angles():
    model = _model(num_latents=40, latent_rotary_emb_dim=8, output_dim=3)
    x = _data()
    expected = model(x)
    low = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, atol=0.1, rtol=0.1)
