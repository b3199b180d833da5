"""FourierPositionEncoding's per-shape cache is derived data: it is not pickled (torch.save(model), deepcopy, a
model sent to spawned workers), and a copy computes the same features again."""

import copy
import io
import pickle

import torch

from perceivers import GatedPerceiver
from perceivers.layers import FourierPositionEncoding


def _saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def test_cached_features_are_not_pickled():
    enc = FourierPositionEncoding(2, 4, 16.0)
    empty = len(pickle.dumps(enc))
    feats = enc((64, 64))  # [4096, 18] cached: 295 kB
    assert enc._cache
    assert len(pickle.dumps(enc)) == empty  # was 295 kB more
    for clone in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
        assert not clone._cache
        assert torch.equal(clone((64, 64)), feats)
    assert enc._cache  # the original keeps its cache


def test_saved_model_after_a_forward_keeps_its_size_and_outputs():
    torch.manual_seed(0)
    model = GatedPerceiver(input_channels=3, input_axis=2, num_freq_bands=4, max_freq=10.0, depth=1, num_classes=3,
                           num_latents=4, latent_dim=16, cross_heads=1, latent_heads=2, cross_dim_head=8,
                           latent_dim_head=8).eval()
    before = _saved_size(model)
    image = torch.randn(1, 64, 64, 3)
    with torch.no_grad():
        expected = model(image)
    assert _saved_size(model) < before + 4096  # the cached [4096, 18] features made it 295 kB larger
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(image), expected)
