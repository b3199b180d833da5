"""Bad input to the perceiver-pytorch family raises ValueError/TypeError naming what was expected and
what came."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from perceivers import Perceiver, PerceiverBlock, PerceiverIO, PerceiverLM

P_KW = {
    "num_freq_bands": 3,
    "depth": 2,
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
IO_KW = {
    "depth": 1,
    "dim": 10,
    "queries_dim": 12,
    "logits_dim": 7,
    "num_latents": 6,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}
LM_KW = {
    "num_tokens": 11,
    "dim": 12,
    "max_seq_len": 10,
    "depth": 1,
    "num_latents": 5,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}
BLOCK_KW = {"dim": 16, "context_dim": 12, "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8}


@pytest.fixture(scope="module")
def models():
    return {
        "perceiver": Perceiver(**P_KW),
        "perceiver_1d": Perceiver(**{**P_KW, "input_axis": 1}),
        "io": PerceiverIO(**IO_KW),
        "lm": PerceiverLM(**LM_KW),
        "block": PerceiverBlock(**BLOCK_KW),
        "block_qkv": PerceiverBlock(**{**BLOCK_KW, "context_dim": None, "queries_contribute_kv": True}),
        "block_latent": PerceiverBlock(**{**BLOCK_KW, "has_cross_attn": False}),
        "perceiver_residual": Perceiver(**P_KW, attn_residual=True),
    }


def _img(*shape):
    return torch.randn(*shape)


B = torch.bool
# id → (model, call, exception type, regex fragments that must all appear in the message: expected and actual)
CASES = {
    # Perceiver
    "rank_too_low": (
        "perceiver",
        lambda m: m(_img(2, 20, 3)),
        ValueError,
        ["4 dims", "input_axis=2", r"\(2, 20, 3\)"],
    ),
    "rank_too_high": (
        "perceiver",
        lambda m: m(_img(2, 5, 4, 1, 3)),
        ValueError,
        ["4 dims", r"\(2, 5, 4, 1, 3\)"],
    ),
    "input_axis_mismatch": (
        "perceiver_1d",
        lambda m: m(_img(2, 5, 4, 3)),
        ValueError,
        ["3 dims", "input_axis=1", "got 4 dims"],
    ),
    "channels": ("perceiver", lambda m: m(_img(2, 5, 4, 4)), ValueError, ["3 channels", "got 4"]),
    "integer_data": (
        "perceiver",
        lambda m: m(torch.ones(2, 5, 4, 3, dtype=torch.long)),
        TypeError,
        ["floating-point", "int64"],
    ),
    "numpy_data": (
        "perceiver",
        lambda m: m(np.zeros((2, 5, 4, 3), np.float32)),
        TypeError,
        ["torch.Tensor", "ndarray"],
    ),
    "empty_data": ("perceiver", lambda m: m(_img(2, 0, 4, 3)), ValueError, ["empty", r"\(2, 0, 4, 3\)"]),
    "mask_shape": (
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), mask=torch.ones(2, 5, 5, dtype=B)),
        ValueError,
        ["20", r"\(2, 5, 5\)"],
    ),
    "mask_axes_transposed": (  # as many elements as the data's axes, but not their shape
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), mask=torch.ones(2, 4, 5, dtype=B)),
        ValueError,
        [r"\[batch=2, 5, 4\]", r"\[batch, 20\]", r"\(2, 4, 5\)"],
    ),
    "mask_axes_regrouped": (
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), mask=torch.ones(2, 2, 10, dtype=B)),
        ValueError,
        [r"5, 4", r"\(2, 2, 10\)"],
    ),
    "block_outputs_shape": (
        "perceiver_residual",
        lambda m: m(_img(2, 5, 4, 3), block_outputs=[_img(2, 7, 16)]),
        ValueError,
        [r"block_outputs\[0\]", r"\(2, 6, 16\)", r"\(2, 7, 16\)"],
    ),
    "mask_batch": (
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), mask=torch.ones(3, 20, dtype=B)),
        ValueError,
        ["batch=2", r"\(3, 20\)"],
    ),
    "mask_float": (
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), mask=torch.ones(2, 5, 4)),
        (ValueError, TypeError),
        ["torch.bool", "float32"],
    ),
    "mask_int": (
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), mask=torch.ones(2, 20, dtype=torch.long)),
        (ValueError, TypeError),
        ["torch.bool", "int64"],
    ),
    "mask_list": (
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), mask=[[True] * 20] * 2),
        TypeError,
        ["bool", "list"],
    ),
    "pos_shape": (
        "perceiver",
        lambda m: m(_img(2, 20, 3), pos=torch.rand(2, 20, 3)),
        ValueError,
        [r"\(2, 20, 2\)", r"\(2, 20, 3\)"],
    ),
    "pos_with_grid_data": (  # data must be flattened when coordinates are given
        "perceiver",
        lambda m: m(_img(2, 5, 4, 3), pos=torch.rand(2, 20, 2)),
        ValueError,
        [r"\[batch, n, channels\]", "with pos=", r"\(2, 5, 4, 3\)"],
    ),
    # PerceiverIO
    "io_rank": ("io", lambda m: m(_img(2, 10)), ValueError, ["3 dims", r"\(2, 10\)"]),
    "io_rank4": ("io", lambda m: m(_img(2, 3, 3, 10)), ValueError, ["3 dims", r"\(2, 3, 3, 10\)"]),
    "io_channels": ("io", lambda m: m(_img(2, 9, 11)), ValueError, ["10 channels", "got 11"]),
    "io_mask_shape": (
        "io",
        lambda m: m(_img(2, 9, 10), mask=torch.ones(2, 8, dtype=B)),
        ValueError,
        ["9", r"\(2, 8\)"],
    ),
    "io_mask_dtype": (
        "io",
        lambda m: m(_img(2, 9, 10), mask=torch.ones(2, 9)),
        (ValueError, TypeError),
        ["torch.bool", "float32"],
    ),
    "queries_width": ("io", lambda m: m(_img(2, 9, 10), queries=_img(4, 5)), ValueError, ["12", "got 5"]),
    "queries_width_3d": (
        "io",
        lambda m: m(_img(2, 9, 10), queries=_img(2, 4, 13)),
        ValueError,
        ["12", "got 13"],
    ),
    "queries_rank1": (
        "io",
        lambda m: m(_img(2, 9, 10), queries=_img(12)),
        ValueError,
        [r"\[m, queries_dim\]", r"\(12,\)"],
    ),
    "queries_rank4": (
        "io",
        lambda m: m(_img(2, 9, 10), queries=_img(1, 2, 4, 12)),
        ValueError,
        [r"\[batch, m, queries_dim\]", r"\(1, 2, 4, 12\)"],
    ),
    "queries_batch": ("io", lambda m: m(_img(2, 9, 10), queries=_img(3, 4, 12)), ValueError, ["3", "2"]),
    "queries_int": (
        "io",
        lambda m: m(_img(2, 9, 10), queries=torch.ones(4, 12, dtype=torch.long)),
        TypeError,
        ["floating-point", "int64"],
    ),
    # PerceiverLM
    "token_too_large": ("lm", lambda m: m(torch.tensor([[0, 11]])), ValueError, [r"\[0, 11\)", r"\[0, 11\]"]),
    "token_negative": ("lm", lambda m: m(torch.tensor([[0, -1]])), ValueError, [r"\[0, 11\)", "-1"]),
    "too_long": (
        "lm",
        lambda m: m(torch.zeros(1, 11, dtype=torch.long)),
        ValueError,
        ["11", "max_seq_len=10"],
    ),
    "float_ids": ("lm", lambda m: m(torch.zeros(1, 3)), TypeError, ["int64", "float32"]),
    "ids_rank": (
        "lm",
        lambda m: m(torch.zeros(3, dtype=torch.long)),
        ValueError,
        [r"\[batch, seq_len\]", r"\(3,\)"],
    ),
    "lm_mask_shape": (
        "lm",
        lambda m: m(torch.zeros(1, 3, dtype=torch.long), mask=torch.ones(1, 4, dtype=B)),
        ValueError,
        ["3", r"\(1, 4\)"],
    ),
    # PerceiverBlock
    "block_context_width": (
        "block",
        lambda m: m(_img(2, 5, 16), context=_img(2, 9, 16)),
        ValueError,
        ["12 channels", "got 16"],
    ),
    "block_latent_width": (
        "block",
        lambda m: m(_img(2, 5, 15), context=_img(2, 9, 12)),
        ValueError,
        ["16 channels", "got 15"],
    ),
    "block_latent_rank": (
        "block",
        lambda m: m(_img(5, 16), context=_img(2, 9, 12)),
        ValueError,
        ["3 dims", r"\(5, 16\)"],
    ),
    "block_latent_only_width": ("block_latent", lambda m: m(_img(2, 6, 15)), ValueError, ["16 channels", "got 15"]),
    "block_latent_only_rank": ("block_latent", lambda m: m(_img(6, 16)), ValueError, ["3 dims", r"\(6, 16\)"]),
    "block_no_context": ("block", lambda m: m(_img(2, 5, 16)), ValueError, ["context"]),
    "block_batch": ("block", lambda m: m(_img(2, 5, 16), context=_img(3, 9, 12)), ValueError, ["3", "2"]),
    "block_mask_shape": (
        "block",
        lambda m: m(_img(2, 5, 16), context=_img(2, 9, 12), mask=torch.ones(2, 8, dtype=B)),
        ValueError,
        ["9", r"\(2, 8\)"],
    ),
    "block_mask_dtype": (
        "block",
        lambda m: m(_img(2, 5, 16), context=_img(2, 9, 12), mask=torch.ones(2, 9)),
        (ValueError, TypeError),
        ["torch.bool", "float32"],
    ),
    "block_qkv_mask_shape": (
        "block_qkv",
        lambda m: m(_img(2, 5, 16), context=_img(2, 9, 16), mask=torch.ones(2, 8, dtype=B)),
        ValueError,
        ["9", r"\(2, 8\)"],
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named(models, case):
    key, call, exc, fragments = CASES[case]
    with pytest.raises(exc) as info:
        call(models[key])
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in message: {message!r}"


CONSTRUCTOR_CASES = {
    "inverted_tuple_length": (
        lambda: Perceiver(**P_KW, inverted_cross_attn=(True,)),
        ValueError,
        ["2", "got 1"],
    ),
    "depth_zero": (lambda: Perceiver(**{**P_KW, "depth": 0}), ValueError, ["depth", "0"]),
    "num_latents_zero": (lambda: Perceiver(**{**P_KW, "num_latents": 0}), ValueError, ["num_latents", ">= 1", "0"]),
    "input_axis_zero": (lambda: Perceiver(**{**P_KW, "input_axis": 0}), ValueError, ["input_axis", ">= 1", "0"]),
    "input_channels_negative": (lambda: Perceiver(**{**P_KW, "input_channels": -1}), ValueError,
                                ["input_channels", ">= 0", "-1"]),
    "no_channels_no_positions": (lambda: Perceiver(**{**P_KW, "input_channels": 0, "fourier_encode_data": False}),
                                 ValueError, ["input_channels=0", "fourier_encode_data=True"]),
    "io_latent_dim": (lambda: PerceiverIO(**{**IO_KW, "latent_dim": 0}), ValueError, ["latent_dim", "0"]),
    "block_heads": (lambda: PerceiverBlock(**{**BLOCK_KW, "latent_heads": 2.0}), ValueError, ["latent_heads", "2.0"]),
    "attn_dropout_above_one": (lambda: Perceiver(**P_KW, attn_dropout=1.5), ValueError, [r"\[0, 1\]", "1.5"]),
    "attn_dropout_negative": (lambda: PerceiverBlock(**BLOCK_KW, attn_dropout=-0.5), ValueError, [r"\[0, 1\]", "-0.5"]),
    "seq_dropout_range": (
        lambda: PerceiverIO(**IO_KW, seq_dropout_prob=1.0),
        ValueError,
        [r"\[0, 1\)", "1.0"],
    ),
    "queries_contribute_kv_dims": (
        lambda: PerceiverBlock(**{**BLOCK_KW, "queries_contribute_kv": True}),
        ValueError,
        ["12", "16"],
    ),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES)
def test_bad_arguments_are_named(case):
    build, exc, fragments = CONSTRUCTOR_CASES[case]
    with pytest.raises(exc) as info:
        build()
    for fragment in fragments:
        assert re.search(fragment, str(info.value)), f"{fragment!r} not in message: {info.value}"


def test_valid_variants_still_work(models):
    """The checks accept every documented form: flat or axes-shaped masks, int32 ids, 2-D or 3-D queries."""
    x = _img(2, 5, 4, 3)
    assert models["perceiver"](x, mask=torch.ones(2, 5, 4, dtype=B)).shape == (2, 5)
    assert models["perceiver"](x, mask=torch.ones(2, 20, dtype=B)).shape == (2, 5)
    assert models["lm"](torch.zeros(2, 10, dtype=torch.int32)).shape == (2, 10, 11)
    data = _img(2, 9, 10)
    assert models["io"](data, queries=_img(4, 12)).shape == (2, 4, 7)
    assert models["io"](data, queries=_img(2, 4, 12)).shape == (2, 4, 7)
    assert models["block"](_img(2, 5, 16), context=_img(2, 9, 12), mask=torch.ones(2, 9, dtype=B)).shape == (
        2,
        5,
        16,
    )


def test_layers_are_a_read_only_schedule():
    """``model.layers`` (perceiver-pytorch's list of every step's block) is rebuilt from ``blocks`` and
    ``block_order`` on each access: it reads as the schedule and refuses changes that would be lost."""
    tied = Perceiver(**{**P_KW, "depth": 3}, weight_tie_layers=True)
    assert len(tied.layers) == 3 and tied.layers[1] is tied.layers[2] is tied.blocks[1]
    io = PerceiverIO(**{**IO_KW, "depth": 3}, weight_tie_layers=True)
    assert len(io.layers) == 3 and all(layer is io.blocks[0] for layer in io.layers)
    for model in (tied, io):
        for change in (lambda layers: layers.append(torch.nn.Identity()),
                       lambda layers: layers.__setitem__(0, torch.nn.Identity()),
                       lambda layers: layers.__delitem__(0),
                       lambda layers: layers.insert(0, torch.nn.Identity()),
                       lambda layers: layers.extend([torch.nn.Identity()]),
                       lambda layers: layers.pop(0)):
            with pytest.raises(TypeError, match="read-only view of model.blocks"):
                change(model.layers)
        assert len(model.layers) == 3
