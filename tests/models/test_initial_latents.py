"""``latents=``: starting a forward pass from given latents instead of the learned ones."""

import pytest
import torch

from perceivers import Perceiver, PerceiverIO


def _perceiver(**kw):
    torch.manual_seed(0)
    return Perceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=8.0, depth=2, num_latents=16,
                     latent_dim=32, cross_dim_head=8, latent_dim_head=8, latent_heads=2, num_classes=5,
                     **kw).eval()


def _io():
    torch.manual_seed(0)
    return PerceiverIO(dim=6, queries_dim=4, logits_dim=3, depth=2, num_latents=16, latent_dim=32,
                       cross_dim_head=8, latent_dim_head=8, latent_heads=2).eval()


def test_learned_latents_passed_explicitly_change_nothing():
    model, img = _perceiver(), torch.randn(2, 8, 8, 3)
    torch.testing.assert_close(model(img, latents=model.latents.detach()), model(img), rtol=0, atol=0)
    io, seq, q = _io(), torch.randn(2, 10, 6), torch.randn(7, 4)
    torch.testing.assert_close(io(seq, queries=q, latents=io.latents.detach().expand(2, -1, -1)),
                               io(seq, queries=q), rtol=0, atol=0)


def test_per_sample_latents_and_another_count():
    model, img = _perceiver(), torch.randn(2, 8, 8, 3)
    z = torch.randn(2, 5, 32)
    both = model(img, latents=z, return_embeddings=True)
    assert both.shape == (2, 5, 32)
    # each sample uses only its own row of latents
    torch.testing.assert_close(both[1:], model(img[1:], latents=z[1:], return_embeddings=True))
    assert model(img, latents=z).shape == (2, 5)
    io = _io()
    assert io(torch.randn(2, 10, 6), latents=torch.randn(3, 32)).shape == (2, 3, 32)


def test_carrying_latents_through_a_stream_of_chunks():
    """The state after chunk t seeds chunk t+1, and gradients reach the first chunk through it."""
    model = _perceiver().train()
    chunks = torch.randn(3, 1, 8, 8, 3)
    z = model.latents.detach().clone().unsqueeze(0).requires_grad_(True)
    state = z
    for chunk in chunks:
        state = model(chunk, latents=state, return_embeddings=True)
    state.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # a different starting state gives a different end state
    with torch.no_grad():
        other = z.detach() + 1.0
        for chunk in chunks:
            other = model(chunk, latents=other, return_embeddings=True)
    assert not torch.allclose(other, state.detach())


def test_streamed_input_path_takes_the_given_latents():
    model, img = _perceiver(), torch.randn(1, 8, 8, 3)
    z = torch.randn(1, 6, 32)
    whole = model(img, latents=z)
    model.chunk_size = 16  # 64 pixels in 4 chunks
    assert model.context_stream(img, None) is not None
    torch.testing.assert_close(model(img, latents=z), whole, rtol=1e-5, atol=1e-6)
    model.chunk_size = 0  # the whole context, no stream and no grid kernel
    assert model.context_stream(img, None) is None
    torch.testing.assert_close(model(img, latents=z), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("latents", "error", "words"),
    [
        (torch.randn(16, 31), ValueError, "[num_latents, 32]"),
        (torch.randn(3, 16, 32), ValueError, "batch size 3"),
        (torch.randn(16), ValueError, "got shape (16,)"),
        (torch.zeros(0, 32), ValueError, "got shape (0, 32)"),
        (torch.ones(16, 32, dtype=torch.long), TypeError, "floating-point"),
        ([[0.0] * 32], TypeError, "got list"),
        (torch.randn(16, 32, dtype=torch.float64), ValueError, "must match the input"),
        (torch.full((16, 32), float("nan")), ValueError, "latents must be finite"),
    ],
)
def test_bad_latents_are_refused(latents, error, words):
    model = _perceiver()
    with pytest.raises(error) as info:
        model(torch.randn(2, 8, 8, 3), latents=latents)
    assert words in str(info.value)
