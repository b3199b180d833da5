"""Parity with perceiver-pytorch 0.11.0: same weights → same outputs and same gradients.

Every reference parameter is randomised (norms and biases too), converted with
``perceivers.convert.from_lucidrains`` and loaded with ``strict=True`` into the perceivers model built
with the same keyword arguments. Outputs must agree within 1e-5 (float32); gradients of every
parameter and input within 1e-5 relative to the tensor's largest entry.
"""

from __future__ import annotations

import pytest
import torch

import perceivers
from perceivers.convert import from_lucidrains

ref = pytest.importorskip("perceiver_pytorch", reason="perceiver-pytorch (test extra) is not installed")

# Tiny sizes: a few latents, narrow heads.
BASE = {
    "num_freq_bands": 3,
    "depth": 3,
    "max_freq": 8.0,
    "input_channels": 3,
    "input_axis": 2,
    "num_latents": 6,
    "latent_dim": 16,
    "cross_heads": 1,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
    "num_classes": 5,
}
AXES = {1: (7,), 2: (5, 4), 3: (3, 4, 2)}


def _mask(batch: int, axes: tuple[int, ...], flat: bool = False) -> torch.Tensor:
    """A random key mask with at least one kept element per sample (True = attend)."""
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand(batch, *axes, generator=gen) > 0.4
    mask.view(batch, -1)[:, 0] = True
    return mask.view(batch, -1) if flat else mask


def _perceiver_case(parity, randomize, kwargs, *, masked=False, flat_mask=False, batch=2, **forward):
    kwargs = {**BASE, **kwargs}
    axes = AXES[kwargs["input_axis"]]
    data = torch.randn(batch, *axes, kwargs["input_channels"])
    mask = _mask(batch, axes, flat_mask) if masked else None

    def run(model, data, mask):
        return model(data, mask=mask, **forward)

    return parity(
        "Perceiver",
        ref.Perceiver(**kwargs),
        perceivers.Perceiver(**kwargs),
        run,
        {"data": data, "mask": mask},
        randomize=randomize,
    )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("self_per_cross_attn", [1, 2])
@pytest.mark.parametrize("weight_tie_layers", [False, True], ids=["untied", "tied"])
def test_perceiver_tying_and_mask(parity, randomize, weight_tie_layers, self_per_cross_attn, masked):
    _perceiver_case(
        parity,
        randomize,
        {"weight_tie_layers": weight_tie_layers, "self_per_cross_attn": self_per_cross_attn},
        masked=masked,
    )


@pytest.mark.parametrize("input_axis", [1, 2, 3])
def test_perceiver_input_axis(parity, randomize, input_axis):
    _perceiver_case(parity, randomize, {"input_axis": input_axis, "input_channels": 2}, masked=True)


def test_perceiver_flat_mask(parity, randomize):
    _perceiver_case(parity, randomize, {}, masked=True, flat_mask=True)


PERCEIVER_OPTIONS = {
    "return_embeddings": ({}, {"return_embeddings": True}),
    "no_classifier_head": ({"final_classifier_head": False}, {}),
    "no_fourier": ({"fourier_encode_data": False}, {}),
    "return_hiddens": ({"weight_tie_layers": True, "self_per_cross_attn": 2}, {"return_hiddens": True}),
    "attn_residual": ({"attn_residual": True, "attn_residual_rank": 4}, {"return_hiddens": True}),
    "attn_residual_tied": ({"attn_residual": True, "attn_residual_rank": 4, "weight_tie_layers": True}, {}),
    "block_outputs": (
        {"attn_residual": True, "attn_residual_rank": 4},
        {"block_outputs": [torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))]},
    ),
    "block_outputs_empty": ({"attn_residual": True, "attn_residual_rank": 4}, {"block_outputs": [], "return_hiddens": True}),
    "inverted": ({"inverted_cross_attn": True}, {}),
    "inverted_tuple": ({"inverted_cross_attn": (True, False, True), "weight_tie_layers": True}, {}),
    "cross_heads": ({"cross_heads": 2, "latent_heads": 4}, {}),
    "dropout_eval": ({"attn_dropout": 0.3, "ff_dropout": 0.3}, {}),
    "positions_only": ({"input_channels": 0}, {}),  # Fourier features are the whole input
}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("option", PERCEIVER_OPTIONS)
def test_perceiver_options(parity, randomize, option, masked):
    kwargs, forward = PERCEIVER_OPTIONS[option]
    _perceiver_case(parity, randomize, kwargs, masked=masked, **forward)


BLOCK_CASES = {
    "default": ({}, True),
    "queries_contribute_kv": ({"queries_contribute_kv": True}, True),
    "queries_contribute_kv_nomask": ({"queries_contribute_kv": True}, False),
    "context_dim": ({"context_dim": 12, "self_per_cross_attn": 2, "cross_heads": 2}, True),
    "no_cross_attn": ({"has_cross_attn": False}, False),
}


@pytest.mark.parametrize("inverted", [False, True], ids=["plain", "inverted"])
@pytest.mark.parametrize("case", BLOCK_CASES)
def test_perceiver_block(parity, randomize, case, inverted):
    extra, masked = BLOCK_CASES[case]
    kwargs = {
        "dim": 16,
        "cross_heads": 1,
        "latent_heads": 2,
        "cross_dim_head": 8,
        "latent_dim_head": 8,
        **extra,
    }
    has_cross = kwargs.get("has_cross_attn", True)
    latents = torch.randn(2, 5, 16)
    context = torch.randn(2, 9, kwargs.get("context_dim", 16)) if has_cross else None
    mask = _mask(2, (9,)) if masked else None

    def run(model, latents, context, mask):
        return model(latents, context=context, mask=mask, inverted_attention=inverted)

    parity(
        "PerceiverBlock",
        ref.PerceiverBlock(**kwargs),
        perceivers.PerceiverBlock(**kwargs),
        run,
        {"latents": latents, "context": context, "mask": mask},
        convert=parity.convert_block,
        randomize=randomize,
    )


IO_BASE = {
    "depth": 2,
    "dim": 10,
    "queries_dim": 12,
    "logits_dim": 7,
    "num_latents": 6,
    "latent_dim": 16,
    "cross_heads": 1,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}
IO_CASES = {
    "no_queries": ({}, None, False, {}),
    "queries_2d": ({}, (4, 12), False, {}),
    "queries_3d": ({}, (2, 4, 12), False, {}),
    "queries_3d_mask": ({}, (2, 4, 12), True, {}),
    "no_logits_dim": ({"logits_dim": None}, (4, 12), True, {}),
    "decoder_ff": ({"decoder_ff": True}, (4, 12), True, {}),
    "weight_tie": ({"weight_tie_layers": True, "depth": 3}, (2, 4, 12), True, {}),
    "attn_residual": (
        {"attn_residual": True, "attn_residual_rank": 4},
        (4, 12),
        True,
        {"return_hiddens": True},
    ),
    "attn_residual_tied": (
        {"attn_residual": True, "attn_residual_rank": 4, "weight_tie_layers": True},
        (4, 12),
        False,
        {},
    ),
    "return_hiddens_no_queries": ({}, None, True, {"return_hiddens": True}),
    "block_outputs_empty": (
        {"attn_residual": True, "attn_residual_rank": 4},
        (4, 12),
        False,
        {"block_outputs": [], "return_hiddens": True},
    ),
    "inverted": ({"inverted_cross_attn": True}, (4, 12), True, {}),
    "cross_heads": ({"cross_heads": 3, "latent_heads": 4, "decoder_ff": True}, (2, 4, 12), True, {}),
}


@pytest.mark.parametrize("case", IO_CASES)
def test_perceiver_io(parity, randomize, case):
    extra, queries_shape, masked, forward = IO_CASES[case]
    kwargs = {**IO_BASE, **extra}
    data = torch.randn(2, 9, kwargs["dim"])
    queries = torch.randn(queries_shape) if queries_shape else None
    mask = _mask(2, (9,)) if masked else None

    def run(model, data, mask, queries):
        return model(data, mask=mask, queries=queries, **forward)

    parity(
        "PerceiverIO",
        ref.PerceiverIO(**kwargs),
        perceivers.PerceiverIO(**kwargs),
        run,
        {"data": data, "mask": mask, "queries": queries},
        randomize=randomize,
    )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_perceiver_io_seq_dropout_training(parity, randomize, masked):
    """In training, sequence dropout draws the same random tokens from the same seed."""
    kwargs = {**IO_BASE, "seq_dropout_prob": 0.4}
    data = torch.randn(2, 9, kwargs["dim"])
    mask = _mask(2, (9,)) if masked else None

    def run(model, data, mask, queries):
        return model(data, mask=mask, queries=queries)

    parity(
        "PerceiverIO",
        ref.PerceiverIO(**kwargs),
        perceivers.PerceiverIO(**kwargs),
        run,
        {"data": data, "mask": mask, "queries": torch.randn(4, 12)},
        train=True,
        randomize=randomize,
    )


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("weight_tie_layers", [False, True], ids=["untied", "tied"])
def test_perceiver_lm(parity, randomize, weight_tie_layers, masked):
    kwargs = {
        "num_tokens": 11,
        "dim": 12,
        "max_seq_len": 10,
        "depth": 2,
        "num_latents": 5,
        "latent_dim": 16,
        "latent_heads": 2,
        "cross_dim_head": 8,
        "latent_dim_head": 8,
        "weight_tie_layers": weight_tie_layers,
    }
    ids = torch.randint(0, 11, (2, 8))
    mask = _mask(2, (8,)) if masked else None

    def run(model, ids, mask):
        return model(ids, mask=mask)

    parity(
        "PerceiverLM",
        ref.PerceiverLM(**kwargs),
        perceivers.PerceiverLM(**kwargs),
        run,
        {"ids": ids, "mask": mask},
        randomize=randomize,
    )


def test_replacing_to_logits_as_in_perceiver_pytorch():
    """``model.to_logits`` is the classifier the model calls: swapping it (or its last layer) takes effect."""
    torch.manual_seed(0)
    kwargs = {**BASE, "num_classes": 5}
    theirs, ours = ref.Perceiver(**kwargs).eval(), perceivers.Perceiver(**kwargs).eval()
    ours.load_state_dict(from_lucidrains(theirs.state_dict()), strict=True)
    data = torch.randn(2, *AXES[kwargs["input_axis"]], kwargs["input_channels"])
    for model in (theirs, ours):
        torch.manual_seed(1)
        model.to_logits[-1] = torch.nn.Linear(kwargs["latent_dim"], 9)
    torch.testing.assert_close(ours(data), theirs(data), atol=1e-5, rtol=0)
    assert ours(data).shape == (2, 9)
    for model in (theirs, ours):
        model.to_logits = torch.nn.Identity()
    torch.testing.assert_close(ours(data), theirs(data), atol=1e-5, rtol=0)  # the latents
    assert "head.proj.weight" not in ours.state_dict()


@pytest.mark.parametrize("family", ["Perceiver", "PerceiverIO"])
def test_untied_model_with_equal_layers_converts_apart(family):
    """An untied model started from a tied one holds equal layers; weight_tie_layers=False keeps them apart."""
    torch.manual_seed(0)
    kwargs = {**BASE, "depth": 3} if family == "Perceiver" else {**IO_BASE, "depth": 3}
    cls = getattr(ref, family)
    untied = cls(**kwargs)
    untied.load_state_dict(cls(**kwargs, weight_tie_layers=True).state_dict())
    ours = getattr(perceivers, family)(**kwargs)
    ours.load_state_dict(from_lucidrains(untied.state_dict(), weight_tie_layers=False), strict=True)
    assert ours.block_order == tuple(range(3)) and len(ours.blocks) == 3
    with pytest.raises(RuntimeError, match="Missing key"):  # folded by default: fits the tied model only
        ours.load_state_dict(from_lucidrains(untied.state_dict()), strict=True)


@pytest.mark.parametrize("chunk_size", [None, 200], ids=["whole", "chunked"])
def test_perceiver_float64(chunk_size):
    """In float64 the outputs match perceiver-pytorch's to float64 rounding: position features and the
    chunked attention's running sums are computed in float64 (not float32 and cast)."""
    torch.manual_seed(0)
    kwargs = {**BASE, "max_freq": 10.0, "num_freq_bands": 6}
    reference = ref.Perceiver(**kwargs).double().eval()
    ours = perceivers.Perceiver(**kwargs, chunk_size=chunk_size).double().eval()
    ours.load_state_dict(from_lucidrains(reference.state_dict()))
    data = torch.randn(2, 30, 31, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(data), reference(data), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["Perceiver", "PerceiverIO"])
def test_gradients_of_gradients_float64(family):
    """A gradient penalty (``create_graph=True``, then backward) gives perceiver-pytorch's parameter gradients in
    float64: its einsum attention differentiates twice, and so does ours (SDPA's fused kernels do not)."""
    torch.manual_seed(0)
    if family == "Perceiver":
        kwargs = {**BASE, "latent_dim_head": 24, "latent_heads": 1}
        data = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    else:
        kwargs = {"dim": 6, "queries_dim": 5, "logits_dim": 4, "depth": 2, "num_latents": 4, "latent_dim": 16,
                  "cross_heads": 1, "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8}
        data = torch.randn(2, 7, 6, dtype=torch.float64)
    queries = torch.randn(2, 3, 5, dtype=torch.float64)
    reference = getattr(ref, family)(**kwargs).double()
    ours = getattr(perceivers, family)(**kwargs).double()
    ours.load_state_dict(from_lucidrains(reference.state_dict()), strict=True)

    def penalty(model):
        x = data.clone().requires_grad_()
        out = model(x) if family == "Perceiver" else model(x, queries=queries)
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        model.zero_grad()
        (g.square().sum() + out.sum()).backward()
        return g, {name: p.grad for name, p in model.named_parameters()}

    (g_ref, grads_ref), (g, grads) = penalty(reference), penalty(ours)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    expected = from_lucidrains(grads_ref)  # the reference's gradients under our parameter names
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"{name}: {m}")
