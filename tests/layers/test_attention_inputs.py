"""`layers.Attention` checks its call: ranks, mask dtypes and shapes, named in the error (audit 18)."""

import pytest
import torch

from perceivers.layers import Attention


@pytest.fixture
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(16, 8, num_heads=2)


X, C = torch.randn(2, 4, 16), torch.randn(2, 5, 8)


@pytest.mark.parametrize("method", ["forward", "forward_with_weights"])
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mask": torch.ones(2, 5)}, "mask must have dtype torch.bool"),  # was NotImplementedError bitwise_or 'Float'
    ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask must have shape \[batch=2, 5\]"),  # a broadcast error
    ({"mask": torch.ones(1, 5, dtype=torch.bool)}, r"mask must have shape \[batch=2, 5\]"),  # broadcast silently
    ({"query_mask": torch.ones(2, 5, dtype=torch.bool)}, r"query_mask must have shape \[batch=2, 4\]"),
    ({"query_mask": torch.ones(2, 4, dtype=torch.int64)}, "query_mask must have dtype torch.bool"),
])
def test_bad_masks_are_named(attn: Attention, method: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        getattr(attn, method)(X, C, **kwargs)


@pytest.mark.parametrize("method", ["forward", "forward_with_weights"])
def test_bad_ranks_are_named(attn: Attention, method: str) -> None:
    with pytest.raises(ValueError, match=r"x must be a \[batch, queries, 16\] tensor, got \(4, 16\)"):
        getattr(attn, method)(X[0], C)  # was an einops error
    with pytest.raises(ValueError, match=r"context must be a \[batch, keys, 8\] tensor, got \(5, 8\)"):
        getattr(attn, method)(X, C[0])
    with pytest.raises(ValueError, match="kv must be the"):
        getattr(attn, method)(X, kv=(torch.randn(2, 5, 8),) * 2)


def test_masks_of_the_data_axes_still_pass(attn: Attention) -> None:
    """A `[B, *axes]` mask of the keys' count is taken as `[B, K]`, and a valid call is unchanged."""
    mask = torch.tensor([[True, False, True, True, False, True], [True] * 6])
    context = torch.randn(2, 6, 8)
    flat = attn(X, context, mask=mask)
    torch.testing.assert_close(attn(X, context, mask=mask.view(2, 2, 3)), flat)
    kv = attn.project_kv(context)
    torch.testing.assert_close(attn(X, kv=kv, mask=mask), flat)
