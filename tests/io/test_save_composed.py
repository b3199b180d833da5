"""Hand-assembled Perceiver IO compositions save with ``save_pretrained`` and load back identically.

Every building block of :mod:`perceivers.io` records its constructor arguments (``@configurable``),
so a composition is rebuilt from ``config.json`` (nested modules included) and its weights and
buffers (BatchNorm statistics) come from ``model.safetensors``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from perceivers import from_pretrained, save_pretrained
from perceivers.io import (
    BasicDecoder,
    ClassificationDecoder,
    FlowDecoder,
    FourierQueries,
    MultimodalDecoder,
    PerceiverEncoder,
    PerceiverIOModel,
    ProjectionDecoder,
    TrainableQueries,
    VideoAutoencodingDecoder,
    build_position_encoding,
)
from perceivers.io.processors import (
    AudioPostprocessor,
    AudioPreprocessor,
    ClassificationPostprocessor,
    FlowPreprocessor,
    ImagePreprocessor,
    MultimodalPostprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    ProjectionPostprocessor,
    TextPreprocessor,
)
from perceivers.layers import FourierPositionEncoding

D = 16  # latent width


def _encoder(channels: int) -> PerceiverEncoder:
    return PerceiverEncoder(channels, num_latents=4, latent_channels=D, num_self_attends_per_block=1,
                            num_self_attention_heads=2, num_blocks=2)


def _conv_fourier_classifier():
    pos = build_position_encoding("fourier", num_dims=2, index_shape=(2, 3), num_bands=3)
    pre = ImagePreprocessor("conv", position_encoding=pos, spatial_downsample=4, num_channels=6)
    dec = ClassificationDecoder(5, latent_channels=D, num_heads=2)
    return PerceiverIOModel(_encoder(pre.num_channels), dec, input_preprocessor=pre), (torch.randn(2, 3, 8, 11),)


def _learned_positions_projection():
    pos = build_position_encoding("trainable", num_dims=2, index_shape=(3, 4), num_channels=5, project_pos_dim=7)
    pre = ImagePreprocessor("conv1x1", position_encoding=pos, spatial_downsample=1, num_channels=4)
    return PerceiverIOModel(_encoder(pre.num_channels), ProjectionDecoder(3, latent_channels=D),
                            input_preprocessor=pre), (torch.randn(2, 3, 3, 4),)


def _text_fourier_queries():
    pre = TextPreprocessor(vocab_size=30, d_model=8, max_seq_len=10)
    dec = BasicDecoder(FourierQueries((6,), 2), latent_channels=D, output_channels=9, num_heads=1,
                       use_query_residual=True)
    post = ProjectionPostprocessor(9, 4)
    model = PerceiverIOModel(_encoder(8), dec, input_preprocessor=pre, output_postprocessor=post)
    return model, (torch.randint(0, 30, (2, 10)),)


def _layers_fourier_given_directly():
    """A layers-level ``FourierPositionEncoding`` passed straight to a preprocessor, trainable queries."""
    pos = FourierPositionEncoding(1, 2, (12.0,), layout="deepmind")
    pre = AudioPreprocessor(4, position_encoding=pos)
    dec = BasicDecoder(TrainableQueries(3, 6), latent_channels=D, output_channels=2)
    post = ClassificationPostprocessor(2, 5)
    model = PerceiverIOModel(_encoder(pre.num_channels), dec, input_preprocessor=pre, output_postprocessor=post)
    return model, (torch.randn(2, 12),)


def _multimodal():
    audio_pos = build_position_encoding("fourier", num_dims=1, index_shape=(4,), num_bands=3)
    pre = MultimodalPreprocessor(
        {"audio": AudioPreprocessor(4, position_encoding=audio_pos), "label": OneHotPreprocessor(3)},
        mask_probs={"audio": 0.0, "label": 1.0}, min_padding_size=2,
    )
    queries = {"audio": FourierQueries((4,), 2), "label": TrainableQueries(1, 6)}
    dec = MultimodalDecoder(queries, latent_channels=D, output_channels=8)
    post = MultimodalPostprocessor({"audio": AudioPostprocessor(8, 4), "label": ClassificationPostprocessor(8, 3)})
    model = PerceiverIOModel(_encoder(pre.num_channels), dec, input_preprocessor=pre, output_postprocessor=post)
    return model, ({"audio": torch.randn(2, 16), "label": torch.eye(3)[[0, 2]]},)


def _flow():
    pre = FlowPreprocessor(image_size=(4, 6), num_bands=2, num_channels=8)
    dec = FlowDecoder(query_channels=pre.num_channels, latent_channels=D, output_image_shape=(4, 6))
    return PerceiverIOModel(_encoder(pre.num_channels), dec, input_preprocessor=pre), (torch.rand(1, 2, 3, 4, 6),)


def _video():
    pos = build_position_encoding("fourier", num_dims=3, index_shape=(2, 2, 2), num_bands=2)
    pre = ImagePreprocessor("patches", position_encoding=pos, spatial_downsample=2, temporal_downsample=1)
    dec = VideoAutoencodingDecoder((2, 4, 4), latent_channels=D, output_channels=3, num_bands=2)
    return PerceiverIOModel(_encoder(pre.num_channels), dec, input_preprocessor=pre), (torch.randn(1, 2, 3, 4, 4),)


BUILDERS = {f.__name__.lstrip("_"): f for f in (_conv_fourier_classifier, _learned_positions_projection,
                                                 _text_fourier_queries, _layers_fourier_given_directly, _multimodal,
                                                 _flow, _video)}


def _leaves(out):
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _leaves(out[k])]
    return [out]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_composition_round_trips(tmp_path, name, randomize):
    model, args = BUILDERS[name]()
    randomize(model, seed=1)
    model.train()
    with torch.no_grad():
        model(*args)  # move BatchNorm running statistics away from their initial values
    model.eval()
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["class"] == "perceivers.io.model.PerceiverIOModel"
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is PerceiverIOModel
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        want, got = model(*args), loaded(*args)
    for a, b in zip(_leaves(got.logits), _leaves(want.logits), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)


def test_nested_modules_are_recorded_by_class_and_arguments():
    model, _ = _multimodal()
    from perceivers.configurable import init_config

    cfg = init_config(model)["kwargs"]
    pre = cfg["input_preprocessor"]["__module__"]
    assert pre["class"] == "perceivers.io.processors.multimodal.MultimodalPreprocessor"
    audio = pre["kwargs"]["modalities"]["__dict__"]["audio"]["__module__"]
    assert audio["kwargs"]["samples_per_patch"] == 4
    assert audio["kwargs"]["position_encoding"]["__module__"]["class"] == "perceivers.layers.position.FourierPositionEncoding"


def test_unrecorded_part_is_named(tmp_path):
    model, _ = _text_fourier_queries()
    model = PerceiverIOModel(model.encoder, model.decoder, input_preprocessor=model.input_preprocessor,
                             output_postprocessor=nn.Identity())
    with pytest.raises(TypeError, match="output_postprocessor.*Identity"):
        save_pretrained(model, tmp_path)
