"""perceivers.io.processors: layouts, channel orders, padding rules and widths of every processor."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from perceivers.io import build_position_encoding
from perceivers.io.processors import (
    AudioPostprocessor,
    AudioPreprocessor,
    ClassificationPostprocessor,
    ConvDownsample,
    EmbeddingDecoder,
    FlowPreprocessor,
    ImagePreprocessor,
    MultimodalPostprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    ProjectionPostprocessor,
    TextPreprocessor,
    patches_for_flow,
    restructure,
    same_padding,
    space_to_depth,
)


@pytest.mark.parametrize(
    "size,kernel,stride,expected",
    [(224, 7, 2, (2, 3)), (112, 3, 2, (0, 1)), (45, 7, 2, (3, 3)), (23, 3, 2, (1, 1)), (30, 7, 2, (2, 3)),
     (15, 3, 2, (1, 1)), (10, 1, 1, (0, 0)), (7, 1, 2, (0, 0))],
)
def test_same_padding_matches_tensorflow(size: int, kernel: int, stride: int, expected: tuple[int, int]) -> None:
    assert same_padding(size, kernel, stride) == expected


def test_conv_stem_gives_56x56_tokens_at_224() -> None:
    stem = ConvDownsample(3, 4).eval()
    assert stem(torch.randn(1, 3, 224, 224)).shape == (1, 4, 56, 56)


def test_conv_stem_pads_like_tensorflow() -> None:
    torch.manual_seed(0)
    stem = ConvDownsample(3, 5).eval()
    layer = stem.layers[0]
    with torch.no_grad():
        layer.norm.running_mean.normal_()
        layer.norm.running_var.uniform_(0.5, 2)
        layer.norm.weight.normal_()
    x = torch.randn(2, 3, 36, 52)
    y = F.conv2d(F.pad(x, (2, 3, 2, 3)), layer.conv.weight, stride=2)  # explicit TF 'SAME' 2/3
    y = F.relu(layer.norm(y))
    y = F.max_pool2d(F.pad(y, (0, 1, 0, 1), value=float("-inf")), 3, 2)  # 0/1 with -inf
    torch.testing.assert_close(stem(x), y, rtol=0, atol=1e-6)


def test_space_to_depth_channel_order() -> None:
    x = torch.arange(2 * 4 * 4 * 3).reshape(1, 2, 4, 4, 3)  # B T H W C
    y = space_to_depth(x, temporal_block=2, spatial_block=2)  # [1, 1, 2, 2, 24]
    assert y.shape == (1, 1, 2, 2, 24)
    # channel (dt, dh, dw, c): dt=1, dh=0, dw=1, c=2 of the block at (h=1, w=0)
    assert y[0, 0, 1, 0, ((1 * 2 + 0) * 2 + 1) * 3 + 2] == x[0, 1, 2, 1, 2]


@pytest.mark.parametrize(
    "prep,kwargs,channels,tokens",
    [
        ("pixels", {}, 3 + 2 * (2 * 4 + 1), 8 * 12),
        ("pixels", {"spatial_downsample": 2}, 3 + 18, 4 * 6),
        ("conv", {"num_channels": 6, "spatial_downsample": 4}, 6 + 18, 2 * 3),
        ("conv1x1", {"num_channels": 7}, 7 + 18, 8 * 12),
        ("conv1x1", {"num_channels": 7, "spatial_downsample": 2}, 7 + 18, 4 * 6),
        ("patches", {"spatial_downsample": 4}, 48 + 18, 2 * 3),
        ("patches", {"spatial_downsample": 2, "conv_after_patching": True, "num_channels": 5}, 5 + 18, 4 * 6),
    ],
)
def test_image_preprocessor_widths(prep: str, kwargs: dict, channels: int, tokens: int) -> None:
    pos = build_position_encoding("fourier", num_dims=2, num_bands=4, max_resolution=(8, 12))
    pre = ImagePreprocessor(prep, position_encoding=pos, **{"spatial_downsample": 1, **kwargs}).eval()
    out = pre(torch.randn(2, 3, 8, 12))
    assert pre.num_channels == channels
    assert math.prod(pre.output_index_shape((2, 3, 8, 12))) == tokens
    if prep != "patches":  # odd sizes: 'SAME' / strided rounding
        assert math.prod(pre.output_index_shape((2, 3, 9, 13))) == pre(torch.randn(2, 3, 9, 13)).inputs.shape[1]
    assert out.inputs.shape == (2, tokens, channels)
    assert out.inputs_without_pos.shape == (2, tokens, pre.feature_channels)
    assert out.modality_sizes is None


def test_pixels_tokens_are_row_major_channels_last() -> None:
    pre = ImagePreprocessor("pixels", position_encoding=None, spatial_downsample=1)
    x = torch.randn(1, 3, 4, 5)
    tokens = pre(x).inputs
    assert torch.equal(tokens[0, 2 * 5 + 3], x[0, :, 2, 3])


def test_video_and_temporal_downsampling() -> None:
    pos = build_position_encoding("fourier", num_dims=3, num_bands=2, max_resolution=(2, 2, 2))
    pre = ImagePreprocessor("patches", position_encoding=pos, spatial_downsample=4, temporal_downsample=2)
    out = pre(torch.randn(2, 4, 3, 8, 8))  # B T C H W
    assert pre.output_index_shape((2, 4, 3, 8, 8)) == (2, 2, 2)
    assert out.inputs.shape == (2, 2 * 2 * 2, 2 * 4 * 4 * 3 + 3 * 5)


def test_positions_added_and_projected() -> None:
    pos = build_position_encoding("trainable", num_dims=2, index_shape=(4, 5), num_channels=6, project_pos_dim=9)
    pre = ImagePreprocessor("conv1x1", position_encoding=pos, spatial_downsample=1, num_channels=9,
                            concat_or_add_pos="add")
    x = torch.randn(2, 3, 4, 5)
    out = pre(x)
    assert pre.num_channels == 9 and out.inputs.shape == (2, 20, 9)
    expected = out.inputs_without_pos + pos.proj(pos.base.table.embeddings)
    torch.testing.assert_close(out.inputs, expected)
    with pytest.raises(ValueError, match="trainable positions were built for index shape"):
        pre(torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="'add' needs"):
        ImagePreprocessor("pixels", position_encoding=pos, spatial_downsample=1, concat_or_add_pos="add")


def test_image_preprocessor_rejects_bad_inputs() -> None:
    pre = ImagePreprocessor("patches", position_encoding=None, spatial_downsample=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        pre(torch.randn(1, 3, 6, 8))
    with pytest.raises(ValueError, match="input channels"):
        pre(torch.randn(1, 8, 8, 3))  # channels-last by mistake
    with pytest.raises(ValueError, match="power|4, 16"):
        ImagePreprocessor("conv", spatial_downsample=2)


@pytest.mark.parametrize("prep", ["pixels", "conv1x1", "patches"])
@pytest.mark.parametrize("arg", ["spatial_downsample", "temporal_downsample"])
def test_image_preprocessor_downsampling_is_at_least_1(prep: str, arg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{arg} must be an int >= 1, got 0")):
        ImagePreprocessor(prep, **{arg: 0})


def test_patches_for_flow_order_and_padding() -> None:
    frames = torch.randn(2, 2, 3, 5, 6)
    patches = patches_for_flow(frames)
    assert patches.shape == (2, 2, 27, 5, 6)
    dy, dx, c = 2, 0, 1  # neighbour (y+1, x-1), channel 1
    assert torch.equal(patches[1, 0, (3 * dy + dx) * 3 + c, 2, 3], frames[1, 0, c, 3, 2])
    assert torch.all(patches[:, :, (3 * 0 + 1) * 3 + c, 0] == 0)  # row above the top is zero padding


def test_flow_preprocessor_accepts_frames_or_patches() -> None:
    pre = FlowPreprocessor(image_size=(4, 6), num_bands=3, num_channels=8)
    assert pre.num_channels == 8 + 2 * 7
    frames = torch.randn(2, 2, 3, 4, 6)
    a = pre(frames).inputs
    b = pre(patches_for_flow(frames)).inputs
    assert a.shape == (2, 24, 22)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="27"):
        pre(torch.randn(2, 2, 5, 4, 6))


def test_text_preprocessor_adds_positions_and_tied_decoder() -> None:
    pre = TextPreprocessor(vocab_size=10, d_model=4, max_seq_len=6)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    out = pre(ids)
    expected = pre.embeddings.weight[ids] + pre.position_embeddings.embeddings[:3]
    torch.testing.assert_close(out.inputs, expected)
    dec = EmbeddingDecoder(10)
    with torch.no_grad():
        dec.bias.normal_()
    logits = dec(out.inputs, pre.embeddings.weight)
    torch.testing.assert_close(logits, out.inputs @ pre.embeddings.weight.T + dec.bias)
    with pytest.raises(ValueError, match="exceeds"):
        pre(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        pre(torch.tensor([[10]]))


def test_audio_pre_and_postprocessor() -> None:
    pos = build_position_encoding("fourier", num_dims=1, num_bands=3, max_resolution=(32,))
    pre = AudioPreprocessor(8, position_encoding=pos)
    audio = torch.randn(2, 32, 1)
    out = pre(audio)
    assert pre.num_channels == 8 + 7 and out.inputs.shape == (2, 4, 15)
    assert torch.equal(out.inputs_without_pos[1, 2], audio[1, 16:24, 0])
    post = AudioPostprocessor(5, 8)
    assert post(torch.randn(2, 4, 5)).shape == (2, 32)
    with pytest.raises(ValueError, match="divisible"):
        pre(torch.randn(2, 30))


def test_audio_preprocessor_checks_position_mode_at_construction() -> None:
    pos = build_position_encoding("fourier", num_dims=1, num_bands=2, max_resolution=(8,))  # 5 channels
    with pytest.raises(ValueError, match=re.escape("concat_or_add_pos must be 'concat' or 'add', got 'bogus'")):
        AudioPreprocessor(4, position_encoding=pos, concat_or_add_pos="bogus")
    with pytest.raises(ValueError, match=re.escape("'add' needs position channels 5 == features 4")):
        AudioPreprocessor(4, position_encoding=pos, concat_or_add_pos="add")
    with pytest.raises(ValueError, match=re.escape("samples_per_patch must be an int >= 1, got 0")):
        AudioPreprocessor(0)
    added = AudioPreprocessor(5, position_encoding=pos, concat_or_add_pos="add")
    audio = torch.randn(2, 40)
    assert added.num_channels == 5
    torch.testing.assert_close(added(audio).inputs, audio.reshape(2, 8, 5) + pos((8,)))


def test_multimodal_preprocessor_pads_masks_and_sorts() -> None:
    pos1 = build_position_encoding("fourier", num_dims=1, num_bands=2, max_resolution=(8,))
    pre = MultimodalPreprocessor(
        {"label": OneHotPreprocessor(6), "audio": AudioPreprocessor(4, position_encoding=pos1)},
        mask_probs={"audio": 0.0, "label": 1.0}, min_padding_size=3,
    )
    assert pre.num_channels == max(6, 4 + 5) + 3
    audio, label = torch.randn(2, 8), torch.randn(2, 6)
    out = pre({"audio": audio, "label": label})
    assert out.modality_sizes == {"audio": 2, "label": 1}
    assert out.inputs.shape == (2, 3, 12)
    audio_part = out.inputs[:, :2]  # sorted: audio first
    torch.testing.assert_close(audio_part[..., :9], AudioPreprocessor(4, position_encoding=pos1)(audio).inputs)
    torch.testing.assert_close(audio_part[0, 1, 9:], pre.padding["audio"].embeddings[0])
    torch.testing.assert_close(out.inputs[:, 2], pre.mask_tokens["label"].embeddings.expand(2, -1))
    with pytest.raises(ValueError, match="exactly the modalities"):
        pre({"audio": audio})
    with pytest.raises(ValueError, match=re.escape("share the batch size, got {'audio': 2, 'label': 3}")):
        pre({"audio": audio, "label": torch.randn(3, 6)})


@pytest.mark.parametrize("prob", [1.5, -0.3, float("nan")])
def test_multimodal_mask_probs_are_probabilities(prob: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"mask_probs['b'] must be a probability in [0, 1], got {prob}")):
        MultimodalPreprocessor({"a": OneHotPreprocessor(4), "b": OneHotPreprocessor(4)},
                               mask_probs={"a": 0.0, "b": prob})


def test_multimodal_random_masking_rate() -> None:
    pre = MultimodalPreprocessor({"label": OneHotPreprocessor(4)}, mask_probs={"label": 0.3}, min_padding_size=1)
    labels = torch.zeros(4000, 4)
    out = pre({"label": labels}, generator=torch.Generator().manual_seed(0)).inputs[:, 0]
    hit = torch.isclose(out, pre.mask_tokens["label"].embeddings).all(-1).float().mean()
    assert 0.27 < float(hit) < 0.33


def test_postprocessors_and_restructure() -> None:
    x = torch.randn(2, 7, 5)
    parts = restructure({"b": 4, "a": 3}, x)
    assert torch.equal(parts["a"], x[:, :3]) and torch.equal(parts["b"], x[:, 3:])
    post = MultimodalPostprocessor({"b": ProjectionPostprocessor(5, 2), "a": ClassificationPostprocessor(5, 9)})
    out = post(x, modality_sizes={"a": 3, "b": 4})
    assert out["a"].shape == (2, 9) and out["b"].shape == (2, 4, 2)
    with pytest.raises(ValueError, match="expected 8 rows"):
        restructure({"a": 3, "b": 5}, x)
