"""Streamed multimodal inputs: a :class:`MultimodalPreprocessor` whose image modality streams gives a
``ContextStream`` of the padded (and masked) tokens of every modality, equal to the whole array, and a
``PerceiverIOModel`` built on it gives the same outputs and gradients as with the whole array."""

from __future__ import annotations

import pytest
import torch
from memory_probe import LargestFloatOutput

from perceivers.io import (
    FourierQueries,
    MultimodalDecoder,
    PerceiverEncoder,
    PerceiverIOModel,
    TrainableQueries,
    build_position_encoding,
)
from perceivers.io.processors import (
    AudioPostprocessor,
    AudioPreprocessor,
    ClassificationPostprocessor,
    ImagePreprocessor,
    MultimodalPostprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    ProjectionPostprocessor,
)
from perceivers.layers import ContextStream
from perceivers.validation import finite_checks

TOL = {"atol": 2e-5, "rtol": 1e-4}


def _preprocessor(mask_probs=None, grid=(12, 10)) -> MultimodalPreprocessor:
    torch.manual_seed(0)
    image = ImagePreprocessor("pixels", spatial_downsample=1, position_encoding=build_position_encoding(
        "fourier", num_dims=2, index_shape=grid, num_bands=3))
    audio = AudioPreprocessor(4, position_encoding=build_position_encoding(
        "fourier", num_dims=1, index_shape=(6,), num_bands=2))
    return MultimodalPreprocessor({"image": image, "audio": audio, "label": OneHotPreprocessor(5)},
                                  mask_probs=mask_probs, min_padding_size=3)


def _inputs(grid=(12, 10), batch: int = 2) -> dict:
    torch.manual_seed(1)
    return {"image": torch.randn(batch, 3, *grid), "audio": torch.randn(batch, 24),
            "label": torch.nn.functional.one_hot(torch.arange(batch) % 5, 5).float()}


@pytest.mark.parametrize("mask_probs", [None, {"image": 0.3, "audio": 0.0, "label": 1.0}])
def test_streamed_multimodal_tokens_equal_the_whole_array(mask_probs) -> None:
    pre, inputs = _preprocessor(mask_probs), _inputs()
    assert pre.streams(inputs) and pre.stream_length(inputs) == 120
    torch.manual_seed(2)
    whole, sizes, _ = pre(inputs)
    torch.manual_seed(2)
    stream, stream_sizes, without = pre(inputs, chunk_size=20)
    assert isinstance(stream, ContextStream) and stream.shape == whole.shape and stream_sizes == sizes
    assert sizes == {"audio": 6, "image": 120, "label": 1} and without["image"] is None
    for step in (1, 7, 20, stream.length):  # chunks within and across the modalities
        pieces = [stream.chunk(a, min(a + step, stream.length)) for a in range(0, stream.length, step)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=0)


def _model(mask_probs=None) -> PerceiverIOModel:
    pre = _preprocessor(mask_probs)
    torch.manual_seed(0)
    enc = PerceiverEncoder(input_channels=pre.num_channels, num_latents=6, latent_channels=16,
                           num_self_attends_per_block=1, num_self_attention_heads=2)
    dec = MultimodalDecoder({"image": FourierQueries((12, 10), 2), "audio": FourierQueries((6,), 2),
                             "label": TrainableQueries(1, 4)}, latent_channels=16, output_channels=8)
    post = MultimodalPostprocessor({"image": ProjectionPostprocessor(8, 3), "audio": AudioPostprocessor(8, 4),
                                    "label": ClassificationPostprocessor(8, 5)})
    return PerceiverIOModel(enc, dec, input_preprocessor=pre, output_postprocessor=post)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("mask_probs", [None, {"image": 0.3, "audio": 0.5, "label": 1.0}])
def test_streamed_multimodal_model_matches_values_and_gradients(grad: bool, mask_probs) -> None:
    model = _model(mask_probs)
    inputs = _inputs()
    input_mask = torch.rand(2, 127) > 0.2
    results = []
    for size in (0, 16):
        model.chunk_size = size
        model.zero_grad()
        torch.manual_seed(3)
        with torch.set_grad_enabled(grad):
            out = model(inputs, input_mask=input_mask).logits
            if grad:
                sum(v.square().sum() for v in out.values()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None] if grad else []
        results.append(({m: v.detach() for m, v in out.items()}, grads))
    (ref, ref_grads), (got, got_grads) = results
    for m in ref:
        torch.testing.assert_close(got[m], ref[m], **TOL)
    assert len(got_grads) == len(ref_grads)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL)


def test_a_large_multimodal_image_never_exists_as_a_token_array() -> None:
    """At 256×256 (65536 image tokens, above the automatic threshold) neither the image's token array nor the
    padded concatenation of all modalities is ever built."""
    grid = (256, 256)
    pre = _preprocessor(grid=grid)
    torch.manual_seed(0)
    enc = PerceiverEncoder(input_channels=pre.num_channels, num_latents=6, latent_channels=16,
                           num_self_attends_per_block=1, num_self_attention_heads=2)
    model = PerceiverIOModel(enc, None, input_preprocessor=pre).eval()
    inputs = _inputs(grid, batch=1)
    with torch.no_grad():
        assert model._stream_size(inputs) == 32768  # the automatic rule streams the image's 65536 tokens
    model.chunk_size = 4096
    with torch.no_grad(), finite_checks(False), LargestFloatOutput() as probe:
        latents = model(inputs).last_hidden_state
    assert latents.shape == (1, 6, 16)
    # one chunk, padded to 24 channels for the attention, at most; the whole array is 13× that
    assert probe.largest <= 4096 * 24 < 65536 * pre.num_channels // 10


@pytest.mark.parametrize("prep", ["pixels", "patches", "conv1x1"])
@pytest.mark.parametrize("pos", ["fourier", "trainable"])
def test_streamed_video_tokens_equal_the_whole_array(prep: str, pos: str) -> None:
    """A video ``[B, T, C, H, W]`` streams its token rows frame after frame, with 3-D positions."""
    s = 1 if prep == "pixels" else 2
    grid = (3, 6, 5)
    torch.manual_seed(0)
    enc = build_position_encoding(pos, num_dims=3, index_shape=grid, num_bands=2, num_channels=5)
    pre = ImagePreprocessor(prep, position_encoding=enc, spatial_downsample=s, num_channels=6)
    x = torch.randn(2, 3, 3, 6 * s, 5 * s)
    assert pre.streams(x) and pre.output_index_shape(tuple(x.shape)) == grid
    whole = pre(x).inputs
    stream = pre(x, chunk_size=7).inputs
    assert isinstance(stream, ContextStream) and stream.shape == whole.shape
    for step in (3, 5, 12, stream.length):  # within a frame, across frames, all at once
        pieces = [stream.chunk(a, min(a + step, stream.length)) for a in range(0, stream.length, step)]
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-6)
    assert not ImagePreprocessor("patches", spatial_downsample=2, temporal_downsample=3).streams(x)  # time folded
