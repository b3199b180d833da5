"""The usage examples of perceiver-pytorch's README (0.11.0) and of the multi-modality fork's README
(perceiver-multi-modality-pytorch 1.4.0), at their full sizes, with only the import line changed to
``from perceivers import ...``. Each test makes the calls the README makes and checks the shapes the
README states in its comments.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

# The README's Perceiver configuration (perceiver-pytorch 0.11.0).
README_PERCEIVER = {
    "input_channels": 3,
    "input_axis": 2,
    "num_freq_bands": 6,
    "max_freq": 10.0,
    "depth": 6,
    "num_latents": 256,
    "latent_dim": 512,
    "cross_heads": 1,
    "latent_heads": 8,
    "cross_dim_head": 64,
    "latent_dim_head": 64,
    "num_classes": 1000,
    "attn_dropout": 0.0,
    "ff_dropout": 0.0,
    "weight_tie_layers": False,
    "fourier_encode_data": True,
    "self_per_cross_attn": 2,
}


def test_readme_perceiver():
    from perceivers import Perceiver

    model = Perceiver(**README_PERCEIVER)
    img = torch.randn(1, 224, 224, 3)
    assert model(img).shape == (1, 1000)
    # perceiver-pytorch 0.11.0 builds the same number of parameters for this configuration
    assert sum(p.numel() for p in model.parameters()) == 70_395_972


def test_readme_perceiver_tied_parameter_count():
    from perceivers import Perceiver

    model = Perceiver(**{**README_PERCEIVER, "weight_tie_layers": True})
    assert sum(p.numel() for p in model.parameters()) == 23_895_388  # as perceiver-pytorch 0.11.0
    assert len(model.blocks) == 2


def test_readme_perceiver_io():
    from perceivers import PerceiverIO

    model = PerceiverIO(
        dim=32,
        queries_dim=32,
        logits_dim=100,
        depth=6,
        num_latents=256,
        latent_dim=512,
        cross_heads=1,
        latent_heads=8,
        cross_dim_head=64,
        latent_dim_head=64,
        weight_tie_layers=False,
        seq_dropout_prob=0.2,
    )
    seq = torch.randn(1, 512, 32)
    queries = torch.randn(128, 32)
    logits = model(seq, queries=queries)  # a new module is in training mode: sequence dropout is active
    assert logits.shape == (1, 128, 100)


def test_readme_perceiver_block():
    from perceivers import PerceiverBlock

    block = PerceiverBlock(
        dim=96,
        context_dim=96,
        cross_heads=1,
        latent_heads=8,
        cross_dim_head=64,
        latent_dim_head=64,
        queries_contribute_kv=True,
    )
    latents = torch.randn(2, 9, 96)
    data = torch.randn(2, 187, 96)
    mask = torch.ones(2, 187).bool()
    assert block(latents, context=data, mask=mask).shape == (2, 9, 96)


def test_readme_perceiver_lm():
    from perceivers import PerceiverLM

    model = PerceiverLM(
        num_tokens=20000,
        dim=32,
        depth=6,
        max_seq_len=2048,
        num_latents=256,
        latent_dim=512,
        cross_heads=1,
        latent_heads=8,
        cross_dim_head=64,
        latent_dim_head=64,
        weight_tie_layers=False,
    )
    seq = torch.randint(0, 20000, (1, 512))
    mask = torch.ones(1, 512).bool()
    assert model(seq, mask=mask).shape == (1, 512, 20000)


@pytest.mark.skipif(
    importlib.util.find_spec("perceivers.experimental") is None,
    reason="perceivers.experimental is not available",
)
def test_readme_experimental_perceiver():
    """README: "change the above import to ``from perceiver_pytorch.experimental import Perceiver``".

    The experimental Perceiver has no ``self_per_cross_attn`` (perceiver-pytorch's rejects it too), so the
    first example's arguments are used without it. perceiver-pytorch's own experimental model fails with
    Fourier features on (its token width is miscounted); perceivers' runs.
    """
    from perceivers.experimental import Perceiver

    kwargs = {k: v for k, v in README_PERCEIVER.items() if k != "self_per_cross_attn"}
    model = Perceiver(**kwargs)
    img = torch.randn(1, 224, 224, 3)
    assert model(img).shape == (1, 1000)


# ---- perceiver-multi-modality-pytorch's README ------------------------------------------------------------


def test_multimodality_readme_perceiver():
    """The fork's README repeats the Perceiver example (without ``self_per_cross_attn``)."""
    from perceivers import Perceiver

    kwargs = {
        k: v for k, v in README_PERCEIVER.items() if k not in ("self_per_cross_attn", "fourier_encode_data")
    }
    model = Perceiver(**kwargs)
    img = torch.randn(1, 224, 224, 3)
    assert model(img).shape == (1, 1000)


@pytest.mark.slow
def test_multimodality_readme_example():
    """Video 3×32×260×260×3, image 3×260×260×3 and audio 3×44100×1 in one forward (the fork's README)."""
    perceivers = pytest.importorskip("perceivers")
    if not hasattr(perceivers, "MultiModalityPerceiver"):
        pytest.skip("perceivers.MultiModalityPerceiver is not available")
    from perceivers import InputModality, MultiModalityPerceiver

    image_inputs = torch.rand(size=(3, 260, 260, 3), requires_grad=True)
    video_inputs = torch.rand(size=(3, 32, 260, 260, 3), requires_grad=True)
    audio_inputs = torch.rand(size=(3, 44100, 1), requires_grad=True)

    video_modality = InputModality(
        name="video", input_channels=3, input_axis=3, num_freq_bands=6, max_freq=4.0
    )
    image_modality = InputModality(
        name="image", input_channels=3, input_axis=2, num_freq_bands=6, max_freq=4.0
    )
    audio_modality = InputModality(
        name="audio", input_channels=1, input_axis=1, num_freq_bands=6, max_freq=8.0
    )
    model = MultiModalityPerceiver(
        modalities=(video_modality, image_modality, audio_modality),
        depth=8,
        num_latents=12,
        latent_dim=64,
        cross_heads=1,
        latent_heads=8,
        cross_dim_head=64,
        latent_dim_head=64,
        num_classes=1000,
        attn_dropout=0.0,
        ff_dropout=0.0,
        weight_tie_layers=True,
        num_latent_blocks_per_layer=6,
    )
    result = model({"image": image_inputs, "video": video_inputs, "audio": audio_inputs})
    assert result.shape == (3, 1000)
    assert torch.isfinite(result).all()
