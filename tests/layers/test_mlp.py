"""The feed-forward block: its activation inside the first product where allowed, hooks and replacements kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perceivers.layers import FeedForward, use_onednn


def _plain_forward(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    h = F.linear(x, ff.fc1.weight, ff.fc1.bias)
    if ff.activation == "geglu":
        value, gate = h.chunk(2, dim=-1)
        h = value * F.gelu(gate)
    else:
        h = F.gelu(h, approximate="tanh" if ff.activation == "gelu_tanh" else "none")
    return F.linear(h, ff.fc2.weight, ff.fc2.bias)


@pytest.mark.parametrize("activation", ["geglu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("enabled", [True, False])
def test_inference_and_training_match_the_plain_layers(activation, enabled):
    torch.manual_seed(0)
    ff = FeedForward(256, 4, activation)
    x = torch.randn(2, 300, 256)
    with use_onednn(enabled):
        with torch.no_grad():
            torch.testing.assert_close(ff(x), _plain_forward(ff, x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ff(x), _plain_forward(ff, x), rtol=1e-4, atol=1e-5)


def test_hooked_or_replaced_first_layer_is_called_as_a_module():
    """A forward hook on ``fc1`` (or a replaced ``fc1``, e.g. an adapter) still sees every call."""
    torch.manual_seed(1)
    ff = FeedForward(256, 4).eval()
    x = torch.randn(1, 300, 256)
    seen = []
    handle = ff.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with use_onednn(True), torch.no_grad():
        expected = _plain_forward(ff, x)
        torch.testing.assert_close(ff(x), expected, rtol=1e-4, atol=1e-5)
    assert seen == [torch.Size([1, 300, 2048])]
    handle.remove()

    class Scaled(nn.Module):  # stands in for an adapter wrapping the original layer
        def __init__(self, inner: nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t) * 2

    ff.fc1 = Scaled(ff.fc1)
    with use_onednn(True), torch.no_grad():
        value, gate = (F.linear(x, ff.fc1.inner.weight, ff.fc1.inner.bias) * 2).chunk(2, dim=-1)
        torch.testing.assert_close(ff(x), F.linear(value * F.gelu(gate), ff.fc2.weight, ff.fc2.bias),
                                   rtol=1e-4, atol=1e-5)
