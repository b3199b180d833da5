"""Parity of :mod:`perceivers.perceiver_ar_pytorch` with lucidrains' ``perceiver-ar-pytorch`` 0.0.10.

The reference needs only torch and einops, so it is imported in-process from ``.venv/refs/`` (``make setup``
installs it there with ``--no-deps``). Its state dicts load into ours with ``strict=True`` unchanged (and
back); the same seed builds the same weights; eval logits, masks, the loss, a training forward with prefix
and attention dropout, gradients and the wrapper's sampled tokens must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from perceivers.perceiver_ar_pytorch import AutoregressiveWrapper, PerceiverAR

REF = Path(sys.prefix) / "refs" / "perceiver-ar-pytorch-0.0.10"
if not (REF / "perceiver_ar_pytorch").is_dir():
    pytest.skip(f"{REF} missing (make setup installs it)", allow_module_level=True)
if str(REF) not in sys.path:
    sys.path.insert(0, str(REF))
ref = pytest.importorskip("perceiver_ar_pytorch")
ref_wrapper = pytest.importorskip("perceiver_ar_pytorch.autoregressive_wrapper")

TOL = 1e-5
BASE = {"num_tokens": 23, "dim": 24, "depth": 1, "max_seq_len": 20, "cross_attn_seq_len": 8, "dim_head": 32,
        "heads": 2}
CONFIGS = {
    "base": {},
    "deep": {"depth": 2, "perceive_depth": 2, "heads": 3, "perceive_max_heads_process": 2},
    "wide_heads": {"dim_head": 80, "heads": 1, "ff_mult": 2, "cross_attn_seq_len": 12},  # rotary on 40 of 80
    "no_self_layers": {"depth": 0, "heads": 4, "ff_mult": 1.5, "perceive_max_heads_process": 3,
                       "cross_attn_seq_len": 3},
    "no_prefix": {"cross_attn_seq_len": 0, "max_seq_len": 9},
}


def _pair(seed: int = 0, **kwargs) -> tuple[torch.nn.Module, PerceiverAR]:
    """A reference model with randomised parameters and ours loaded from its state dict (strict)."""
    kwargs = {**BASE, **kwargs}
    reference = ref.PerceiverAR(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nothing left at its initial value: norms near 1, small biases, fan-in scaled weights
        for name, p in reference.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif p.ndim == 1:
                p.copy_(1 + 0.3 * noise)
            elif "emb" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)
    ours = PerceiverAR(**kwargs)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference.eval(), ours.eval()


def _tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE["num_tokens"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"reference shape {tuple(a.shape)}, ours {tuple(b.shape)}"
    return (a - b).abs().max().item()


def test_same_seed_same_weights_and_keys() -> None:
    kwargs = {**BASE, **CONFIGS["deep"]}
    torch.manual_seed(0)
    reference = ref.PerceiverAR(**kwargs)
    torch.manual_seed(0)
    ours = PerceiverAR(**kwargs)
    r, o = reference.state_dict(), ours.state_dict()
    assert list(r) == list(o)
    assert all(torch.equal(r[k], o[k]) for k in r)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_logits_mask_and_loss(name: str) -> None:
    reference, ours = _pair(**CONFIGS[name])
    length = ours.cross_attn_seq_len + 7
    x = _tokens(3, length)
    labels = _tokens(3, length, seed=2)
    labels[0, -3:] = 0  # ignored targets
    prefix_mask = torch.rand(3, ours.cross_attn_seq_len, generator=torch.Generator().manual_seed(3)) > 0.4
    with torch.no_grad():
        diffs = {
            "logits": _max_diff(reference(x), ours(x)),
            "prefix_mask": _max_diff(reference(x, prefix_mask), ours(x, prefix_mask)),
            "loss": _max_diff(reference(x, labels=labels), ours(x, labels=labels)),
        }
        scale = ours(x).abs().max().item()
    print(f"perceiver-ar-pytorch {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f" (|logits| <= {scale:.2g})")
    assert max(diffs.values()) <= TOL, diffs


def test_full_length_mask_as_the_reference_pads_it() -> None:
    reference, ours = _pair()
    x = _tokens(2, 17)
    mask = torch.rand(2, 17, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 8:] |= torch.eye(9, dtype=torch.bool)[[0, 5]]  # a few sequence keys masked, never a whole row
    mask[0, 10] = False
    with torch.no_grad():
        assert _max_diff(reference(x, mask), ours(x, mask)) <= TOL


@pytest.mark.parametrize("length", [5, 8, 10, 17])
def test_mask_of_any_length_up_to_the_input_as_the_reference_pads_it(length: int) -> None:
    """The reference pads a shorter mask with True (attend), whatever its length: [B, 5] masks 5 of the 8 prefix
    positions, [B, 10] the prefix and the first 2 sequence keys."""
    reference, ours = _pair()
    x = _tokens(2, 17)
    mask = torch.rand(2, length, generator=torch.Generator().manual_seed(4)) > 0.3
    mask[:, 0] = False
    with torch.no_grad():
        assert _max_diff(reference(x, mask), ours(x, mask)) <= TOL


def test_generate_with_a_mask_of_the_prompt_as_the_reference() -> None:
    """A left-padded prompt's mask [B, prompt length] passed to generate: every later step feeds a longer window,
    which the reference attends beyond the mask (ours refused the second step); the window slides past
    max_seq_len=20 too."""
    reference, ours = _pair(**CONFIGS["deep"])
    start = _tokens(2, 11)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :3] = False
    outs = []
    for wrapper in (ref_wrapper.AutoregressiveWrapper(reference), AutoregressiveWrapper(ours)):
        torch.manual_seed(7)
        outs.append(wrapper.generate(start, 14, temperature=1.3, filter_thres=0.6, prefix_mask=mask))
    assert torch.equal(outs[0], outs[1])


def test_labels_of_the_prefix_are_not_read() -> None:
    """Only labels after the prefix are targets: the reference never reads the first cross_attn_seq_len, so
    e.g. -100 there (the usual "ignore" id) works; ours range-checked them too and refused. A target outside
    the vocabulary is still refused (the reference fails in cross_entropy)."""
    reference, ours = _pair()
    x = _tokens(2, 15)
    labels = _tokens(2, 15, seed=2)
    labels[:, :8] = -100
    with torch.no_grad():
        assert _max_diff(reference(x, labels=labels), ours(x, labels=labels)) <= TOL
    labels[0, 10] = 23
    with pytest.raises(ValueError, match=r"labels after the prefix \(the targets\) must lie in \[0, 23\), got \[0, 23\]"):
        ours(x, labels=labels)


def test_training_forward_same_dropout() -> None:
    """Prefix dropout (one uniform draw, top-k) and attention/feed-forward dropout draw the same numbers:
    with the same seed the training outputs agree (CPU; SDPA's dropout there is the reference's)."""
    reference, ours = _pair(**CONFIGS["deep"], cross_attn_dropout=0.4, dropout=0.2)
    reference.train()
    ours.train()
    x = _tokens(3, 19)
    prefix_mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(5)) > 0.3
    outs = []
    for model in (reference, ours):
        torch.manual_seed(11)
        outs.append(model(x, prefix_mask))
    diff = _max_diff(*outs)
    print(f"perceiver-ar-pytorch training forward: {diff:.2e}")
    assert diff <= TOL
    torch.manual_seed(12)
    assert _max_diff(outs[1], ours(x, prefix_mask)) > 1e-2  # a different seed drops other keys


def test_gradients() -> None:
    """Training mode (prefix dropout 0.25) under one seed: logits, loss and every parameter's gradient of
    ``sum(logits · r) + loss`` agree (gradients relative to each tensor's largest entry, at least 1)."""
    reference, ours = _pair(**CONFIGS["deep"], cross_attn_dropout=0.25)
    x, labels = _tokens(2, 18), _tokens(2, 18, seed=6)
    cotangent = torch.randn(2, 10, BASE["num_tokens"], generator=torch.Generator().manual_seed(8))
    outs = []
    for model in (reference.train(), ours.train()):
        torch.manual_seed(3)
        logits = model(x)
        loss = model(x, labels=labels)
        ((logits * cotangent).sum() + loss).backward()
        outs.append(torch.cat((logits.detach().flatten(), loss.detach()[None])))
    out_diff = _max_diff(*outs)
    ref_params = dict(reference.named_parameters())
    grad_diff = max(
        _max_diff(ref_params[k].grad, p.grad) / max(1.0, ref_params[k].grad.abs().max().item())
        for k, p in ours.named_parameters()
    )
    print(f"perceiver-ar-pytorch gradients: output {out_diff:.2e}, parameter grad (rel) {grad_diff:.2e}")
    assert ref_params.keys() == dict(ours.named_parameters()).keys()
    assert out_diff <= TOL and grad_diff <= TOL


def test_state_dict_loads_both_ways_strict() -> None:
    reference, ours = _pair(**CONFIGS["deep"])
    back = ref.PerceiverAR(**{**BASE, **CONFIGS["deep"]})
    back.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    wrapped = AutoregressiveWrapper(PerceiverAR(**{**BASE, **CONFIGS["deep"]}))
    wrapped.load_state_dict(ref_wrapper.AutoregressiveWrapper(reference).state_dict(), strict=True)
    ref_wrapper.AutoregressiveWrapper(back).load_state_dict(wrapped.state_dict(), strict=True)


@pytest.mark.parametrize("eos", [None, 5])
def test_generate_same_tokens(eos: int | None) -> None:
    reference, ours = _pair(**CONFIGS["deep"])
    reference.train()  # generate switches to eval and back
    ours.train()
    ref_gen, our_gen = ref_wrapper.AutoregressiveWrapper(reference), AutoregressiveWrapper(ours)
    start = _tokens(3, 11)
    if eos is not None:
        start[start == eos] = eos + 1  # the reference also looks for eos in the prompt (see the docs)
    outs = []
    for wrapper in (ref_gen, our_gen):
        torch.manual_seed(7)
        # 24 new tokens: the window slides past max_seq_len=20
        outs.append(wrapper.generate(start, 24, eos_token=eos, temperature=1.3, filter_thres=0.6))
    assert torch.equal(outs[0], outs[1])
    assert ours.training and reference.training
    if eos is not None:
        assert (outs[1] == eos).any()


def test_wrapper_loss_matches() -> None:
    reference, ours = _pair()
    x = _tokens(2, 18)
    with torch.no_grad():
        assert _max_diff(ref_wrapper.AutoregressiveWrapper(reference)(x), AutoregressiveWrapper(ours)(x)) <= TOL


def test_fixed_where_the_reference_fails() -> None:
    _, ours = _pair()
    gen = AutoregressiveWrapper(ours)
    # int((1 - 0.99) * 23) = 0 tokens kept: the reference samples from all -inf and fails; we keep one
    torch.manual_seed(0)
    assert gen.generate(_tokens(1, 9), 3, filter_thres=0.99).shape == (1, 3)
    with pytest.raises(ValueError, match="dim_head must be >= 32"):  # the reference fails in forward
        PerceiverAR(**{**BASE, "dim_head": 16})
    # eos in the prompt: the reference stops after one token; we look at the generated tokens only
    prompt = _tokens(1, 9)
    prompt[0, 0] = 22
    torch.manual_seed(1)
    free = gen.generate(prompt, 5, filter_thres=0.0)
    torch.manual_seed(1)
    stopped = gen.generate(prompt, 5, eos_token=22, filter_thres=0.0)
    first = int((free[0] == 22).nonzero()[0])  # seed 1 generates 22 at position 3
    assert first > 0 and torch.equal(stopped, free[:, : first + 1])
    # a [B, L] mask under prefix dropout (the reference's indexing fails); an empty attention row is finite
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, :12] = False
    assert ours.train()(_tokens(2, 17), mask).isfinite().all()
    assert ours.eval()(_tokens(2, 17), mask).isfinite().all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m(_tokens(2, 21)), ValueError, "exceeds max_seq_len=20"),
        (lambda m: m(_tokens(2, 8)), ValueError, r"must be greater than cross_attn_seq_len=8"),
        (lambda m: m(_tokens(2, 12) + 30), ValueError, r"token ids must lie in \[0, 23\)"),
        (lambda m: m(_tokens(2, 12).float()), TypeError, "token ids"),
        (lambda m: m(_tokens(2, 12), torch.ones(2, 13, dtype=torch.bool)), ValueError, r"\[2, n\] with n <= 12"),
        (lambda m: m(_tokens(2, 12), torch.ones(3, 8, dtype=torch.bool)), ValueError, r"\[2, n\] with n <= 12"),
        (lambda m: m(_tokens(2, 12), torch.ones(2, 8, 1, dtype=torch.bool)), ValueError, r"\[2, n\] with n <= 12"),
        (lambda m: m(_tokens(2, 12), torch.ones(2, 8)), TypeError, "bool"),
        (lambda m: m(_tokens(2, 12), labels=_tokens(2, 11)), ValueError, "labels must have the shape"),
        (lambda m: AutoregressiveWrapper(m).generate(_tokens(1, 8), 2), ValueError, "longer than cross_attn"),
        (lambda m: AutoregressiveWrapper(m).generate(_tokens(1, 9), 2, temperature=0), ValueError, "temperature"),
        # inf: -inf / inf is NaN, and the reference (and we) failed in torch.multinomial
        (lambda m: AutoregressiveWrapper(m).generate(_tokens(1, 9), 2, temperature=float("inf")), ValueError,
         "temperature must be a finite number > 0, got inf"),
        (lambda m: PerceiverAR(**{**BASE, "cross_attn_seq_len": 20}), ValueError, "must be greater than"),
    ],
)
def test_clear_errors(call, error, match) -> None:
    _, ours = _pair()
    with pytest.raises(error, match=match):
        call(ours)


def test_rotary_angles_stay_float32_in_bfloat16() -> None:
    """The reference computes positions × frequencies in the buffer's dtype: bfloat16 after ``.to``. We keep the
    float32 angles (max bf16 logit error vs float32 at L=1024 measured 0.016, the reference's 0.034)."""
    _, ours = _pair()
    positions = torch.arange(1000)
    angles = ours.rotary_pos_emb(positions)
    ours.to(torch.bfloat16)
    assert ours.state_dict()["rotary_pos_emb.inv_freq"].dtype == torch.bfloat16  # the reference's key, cast
    assert torch.equal(ours.rotary_pos_emb(positions), angles) and angles.dtype == torch.float32
    assert ours(_tokens(2, 12)).dtype == torch.bfloat16


def test_float64_matches_to_float64_rounding() -> None:
    """Rotary angles and rotations run in float64 in a float64 model (they were float32: 2e-7 off)."""
    reference, ours = _pair(3, depth=2, heads=3)
    reference.double(), ours.double()
    x = torch.randint(0, BASE["num_tokens"], (2, BASE["max_seq_len"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(ours(x), want, atol=1e-12 * want.abs().max().item(), rtol=0)
