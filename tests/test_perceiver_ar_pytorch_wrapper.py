"""perceivers.perceiver_ar_pytorch beyond the reference: saving (parity lives in tests/parity/test_perceiver_ar_pytorch.py)."""

from __future__ import annotations

import pytest
import torch

import perceivers
from perceivers.perceiver_ar_pytorch import AutoregressiveWrapper, PerceiverAR

TINY = {"num_tokens": 23, "dim": 24, "depth": 1, "max_seq_len": 20, "cross_attn_seq_len": 8, "dim_head": 32,
        "heads": 2}


def test_wrapper_saves_and_rebuilds(tmp_path) -> None:
    """The wrapper is what one trains (its forward is the loss); save_pretrained refused it ("did not record its
    constructor arguments") although the net inside is configurable."""
    wrapper = AutoregressiveWrapper(PerceiverAR(**TINY, cross_attn_dropout=0.25), pad_value=3)
    perceivers.save_pretrained(wrapper, tmp_path)
    again = perceivers.from_pretrained(tmp_path)
    assert type(again) is AutoregressiveWrapper and type(again.net) is PerceiverAR
    assert again.pad_value == 3 and again.max_seq_len == 20 and again.net.perceive_layers[0][0].cross_attn_dropout == 0.25
    x = torch.randint(0, 23, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), wrapper.eval()(x))
    tokens = []
    for model in (wrapper, again):
        torch.manual_seed(5)
        tokens.append(model.generate(x[:, :10], 4))
    assert torch.equal(*tokens)


@pytest.mark.parametrize("length", [1, 9, 22])
def test_wrapper_names_the_length_it_was_given(length) -> None:
    """The wrapper passes ``x[:, :-1]`` on: the net's errors named that length (8 for an input of 9 tokens)."""
    wrapper = AutoregressiveWrapper(PerceiverAR(**TINY))
    with pytest.raises(ValueError, match=f"x must hold 10 to 21 tokens .* got length {length}$"):
        wrapper(torch.zeros(2, length, dtype=torch.long))
