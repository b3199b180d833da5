"""Bad input to the other peers' API classes (krasserm's, FlashPerceiver's, the multi-modality fork's text
model) raises ValueError/TypeError naming what was expected and what came, as the rest of perceivers does
(their own libraries let torch fail deep inside)."""

from __future__ import annotations

import pytest
import torch

from perceivers import krasserm
from perceivers.flash_perceiver import Perceiver as FlashPerceiver
from perceivers.flash_perceiver import PerceiverIO as FlashPerceiverIO
from perceivers.multimodality_fork import InputModalityWithEmbedding, MultiModalityWithTextPerceiver


def _encoder():
    adapter = krasserm.TokenInputAdapter(vocab_size=30, max_seq_len=10, num_input_channels=8)
    return krasserm.PerceiverEncoder(adapter, num_latents=3, num_latent_channels=8, num_cross_attention_heads=2,
                                     num_self_attention_heads=2, num_self_attention_layers_per_block=1)


IDS = torch.randint(0, 30, (2, 7))


@pytest.mark.parametrize(("ids", "pad_mask", "error", "message"), [
    (IDS, torch.zeros(2, 7), TypeError, r"pad_mask must be a torch.bool tensor .* got dtype torch.float32"),
    (IDS, torch.zeros(2, 6, dtype=torch.bool), ValueError, r"pad_mask must have shape \[batch, length\] = \(2, 7\)"),
    (torch.randint(0, 30, (2, 12)), None, ValueError, "token ids have length 12 but max_seq_len is 10"),
    (torch.full((2, 7), 30), None, ValueError, r"token ids must lie in \[0, 30\), got \[30, 30\]"),
    (IDS[..., None], None, ValueError, r"token ids must have 2 dims \[batch, length\], got 3 dims"),
    (IDS.float(), None, TypeError, "token ids must be an integer tensor"),
])
def test_krasserm_encoder(ids, pad_mask, error, message) -> None:
    with pytest.raises(error, match=message):
        _encoder()(ids, pad_mask=pad_mask)


def test_krasserm_valid_input_still_runs() -> None:
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    assert _encoder()(IDS, pad_mask=pad).shape == (2, 3, 8)


def test_flash_perceiver_data_dtype() -> None:
    model = FlashPerceiver(input_dim=6, depth=1, output_dim=3, num_latents=4, latent_dim=16, latent_heads=2,
                           latent_head_dim=8)
    with pytest.raises(TypeError, match=r"data must be a floating-point tensor \[batch, tokens, 6\], got dtype torch.int64"):
        model(torch.ones(2, 5, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="data has dtype torch.float64 but the model's parameters are torch.float32"):
        model(torch.randn(2, 5, 6, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per operation: allowed
        assert model(torch.randn(2, 5, 6)).shape == (2, 3)


def test_flash_perceiver_latents_and_queries() -> None:
    """Latents and queries get the data's checks (they failed in LayerNorm with 'mixed dtype'); zero queries give an
    empty output (they divided by zero in the attention dispatch), zero latents a clear error."""
    torch.manual_seed(0)
    io = FlashPerceiverIO(input_dim=8, query_dim=6, depth=1, proj_dim=5, num_latents=8, latent_dim=16, latent_heads=2,
                          latent_head_dim=8, cross_head_dim=8, query_head_dim=6).eval()
    x = torch.randn(2, 10, 8)
    with pytest.raises(TypeError, match="queries has dtype torch.float64 but the model's parameters are torch.float32"):
        io(x, queries=torch.randn(2, 3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="queries must be a floating-point tensor, got dtype torch.int64"):
        io(x, queries=torch.ones(2, 3, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="latents has dtype torch.float64"):
        io(x, latents=torch.randn(8, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"latents is empty: shape \(0, 16\)"):
        io(x, latents=torch.randn(0, 16))
    with torch.no_grad():
        assert io(x, queries=torch.randn(2, 0, 6)).shape == (2, 0, 5)


def test_fork_text_token_range() -> None:
    text = InputModalityWithEmbedding("text", 1, 1, 2, 10.0, embedding=torch.nn.Embedding(11, 12))
    model = MultiModalityWithTextPerceiver(modalities=[text], depth=2, num_classes=3, num_latent_blocks_per_layer=1,
                                           num_latents=4, latent_dim=16, latent_heads=2, latent_dim_head=8,
                                           cross_dim_head=8)
    with pytest.raises(ValueError, match=r"multi_modality_data\['text'\] \(token ids\) must lie in \[0, 11\), got"):
        model({"text": torch.full((2, 5), 11)})
    assert model({"text": torch.full((2, 5), 10)}).shape == (2, 3)
