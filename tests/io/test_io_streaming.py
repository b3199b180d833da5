"""Streamed image inputs in the DeepMind family (``ImagePreprocessor(..., chunk_size=n)`` →
``ContextStream`` → ``PerceiverEncoder``): the same function as the whole token array, in values and
gradients, with masks and with or without the fold; the automatic rule; and bounded memory."""

from __future__ import annotations

import pytest
import torch
from memory_probe import LargestFloatOutput

import perceivers
from perceivers.io import (
    BasicDecoder,
    ClassificationDecoder,
    FlowDecoder,
    FourierQueries,
    PerceiverEncoder,
    PerceiverIOModel,
    TrainableQueries,
    build_position_encoding,
)
from perceivers.io.model import decoder_reads_inputs
from perceivers.io.processors import ImagePreprocessor
from perceivers.layers import Attention, ContextStream, FourierPositionEncoding
from perceivers.validation import finite_checks

TOL = {"atol": 2e-5, "rtol": 1e-4}


def _pre(prep: str = "pixels", pos: str = "fourier", *, s: int = 1, grid=(12, 10), mode: str = "concat",
         project: int = -1, linear: bool = False) -> ImagePreprocessor:
    torch.manual_seed(0)
    feats = {"pixels": 3, "patches": 3 * s * s, "conv1x1": 6}[prep]
    if linear:
        feats = 6
    enc = build_position_encoding(pos, num_dims=len(grid), index_shape=grid, num_bands=3,
                                  num_channels=feats if mode == "add" else 5, project_pos_dim=project)
    return ImagePreprocessor(prep, position_encoding=enc, spatial_downsample=s, num_channels=6,
                             conv_after_patching=linear, concat_or_add_pos=mode)


CASES = {
    "pixels-fourier": {},
    "pixels-stride2": {"s": 2, "grid": (6, 5)},
    "pixels-none": {"pos": "none"},
    "pixels-trainable": {"pos": "trainable"},
    "pixels-trainable-projected": {"pos": "trainable", "project": 4},
    "pixels-fourier-projected": {"project": 4},
    "patches": {"prep": "patches", "s": 2, "grid": (6, 5)},
    "patches-linear": {"prep": "patches", "s": 2, "grid": (6, 5), "linear": True},
    "patches-linear-add": {"prep": "patches", "s": 2, "grid": (6, 5), "linear": True, "mode": "add", "pos": "trainable"},
    "conv1x1": {"prep": "conv1x1"},
    "conv1x1-stride2": {"prep": "conv1x1", "s": 2, "grid": (6, 5)},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_tokens_equal_the_whole_array(case: str) -> None:
    pre = _pre(**CASES[case])
    x = torch.randn(2, 3, 12, 10)
    assert pre.streams(x)
    whole = pre(x).inputs
    stream = pre(x, chunk_size=7).inputs
    assert isinstance(stream, ContextStream) and stream.shape == tuple(whole.shape)
    assert stream.dtype == whole.dtype and stream.device == whole.device
    torch.testing.assert_close(stream.materialize(), whole, atol=1e-6, rtol=1e-6)
    m = whole.shape[1]
    for a, b in ((0, stream.chunk_size), (3, 17), (m - 9, m)):  # whole rows and arbitrary spans
        torch.testing.assert_close(stream.chunk(a, b), whole[:, a:b], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_tokens_by_position_equal_the_whole_array(case: str) -> None:
    """``rows(index)``, which an exported program with a dynamic image size gathers in a ``torch.while_loop``:
    any positions, in any order, repeated, across rows."""
    pre = _pre(**CASES[case])
    x = torch.randn(2, 3, 12, 10)
    whole, stream = pre(x).inputs, pre(x, chunk_size=7).inputs
    m = whole.shape[1]
    index = torch.cat((torch.randperm(m, generator=torch.Generator().manual_seed(0))[:9], torch.tensor([m - 1, 0, 0])))
    torch.testing.assert_close(stream.rows(index), whole[:, index], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_video_tokens_by_position_equal_the_whole_array(case: str) -> None:
    """A video's ``rows(index)`` (gathered in a ``torch.while_loop`` by a program with a dynamic video size): each
    token from its own frame's pixels, positions from ``(T, h, w)`` tables; any positions, across frames."""
    kw = dict(CASES[case])
    grid = (3, *kw.pop("grid", (12, 10)))
    pre = _pre(**kw, grid=grid)
    x = torch.randn(2, 3, 3, 12, 10)
    whole, stream = pre(x).inputs, pre(x, chunk_size=7).inputs
    m = whole.shape[1]
    index = torch.cat((torch.randperm(m, generator=torch.Generator().manual_seed(0))[:9], torch.tensor([m - 1, 0, 0])))
    torch.testing.assert_close(stream.rows(index), whole[:, index], atol=1e-6, rtol=1e-6)


def test_chunks_hold_whole_token_rows() -> None:
    pre = _pre()
    stream = pre(torch.randn(1, 3, 12, 10), chunk_size=25).inputs
    assert stream.chunk_size == 20  # two rows of 10 tokens


def test_what_streams() -> None:
    assert isinstance(_pre()(torch.randn(1, 3, 12, 10), chunk_size=0).inputs, torch.Tensor)
    video = ImagePreprocessor("pixels", position_encoding=build_position_encoding(
        "fourier", num_dims=3, index_shape=(2, 4, 4), num_bands=2), spatial_downsample=1)
    assert video.streams(torch.randn(1, 2, 3, 4, 4))  # videos: frame after frame
    folded = ImagePreprocessor("patches", position_encoding=None, spatial_downsample=2, temporal_downsample=2)
    assert not folded.streams(torch.randn(1, 2, 3, 4, 4))  # frames folded into each token: built whole
    conv = ImagePreprocessor("conv", position_encoding=None, spatial_downsample=4, num_channels=4)
    assert not conv.streams(torch.randn(1, 3, 16, 16))  # 7×7 stem: a token reads its neighbours
    out = conv(torch.randn(1, 3, 16, 16), chunk_size=8)
    assert isinstance(out.inputs, torch.Tensor)


def _model(pre: ImagePreprocessor | None = None, decoder=None, **kw) -> PerceiverIOModel:
    pre = pre or _pre()
    torch.manual_seed(1)
    enc = PerceiverEncoder(pre.num_channels, num_latents=5, latent_channels=16, num_blocks=1,
                           num_self_attends_per_block=1, num_self_attention_heads=2)
    decoder = decoder or ClassificationDecoder(4, latent_channels=16)
    return PerceiverIOModel(enc, decoder, input_preprocessor=pre, **kw)


def _set_fold(model: torch.nn.Module, value: bool | None) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.fold_kv = value


@pytest.mark.parametrize("fold", [None, False])
@pytest.mark.parametrize("case", ["pixels-fourier", "patches-linear", "conv1x1-stride2", "pixels-trainable-projected"])
def test_streamed_model_matches_values_and_gradients(case: str, fold: bool | None) -> None:
    model = _model(_pre(**CASES[case]))
    _set_fold(model, fold)
    assert model.encoder.cross_attention.attn.folds(num_queries=5, length=120) == (fold is None)
    x = torch.randn(2, 3, 12, 10, requires_grad=True)
    m = model.input_preprocessor(x).inputs.shape[1]
    mask = torch.rand(2, m) > 0.3
    mask[1, : m // 2] = False  # whole chunks without a valid token
    results = []
    for size in (0, 7):
        model.chunk_size = size
        model.zero_grad()
        x.grad = None
        streamed = model._stream_size(x)
        assert bool(streamed) == bool(size)
        out = model(x, input_mask=mask)
        (out.logits.square().sum() + out.last_hidden_state.sum()).backward()
        results.append([out.logits.detach(), x.grad.clone()]
                       + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()])
    names = ["logits", "x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(b, a, **TOL, msg=name)


def test_streamed_inference_with_the_fused_kernel_matches() -> None:
    model = _model().eval()
    x = torch.randn(3, 3, 12, 10)
    with torch.no_grad():
        model.chunk_size = 0
        ref = model(x).logits
        model.chunk_size = 30
        torch.testing.assert_close(model(x).logits, ref, **TOL)


def test_automatic_rule(monkeypatch) -> None:
    model = _model(_pre(grid=(192, 192)))  # 36864 tokens of 3 + 2·(2·3 + 1) = 17 channels
    x = torch.randn(1, 3, 192, 192)
    if perceivers.layers.grid_attention.available():  # the grid kernel takes what is not streamed, as one chunk
        assert model._stream_size(x) == 36864
        assert model._stream_size(x, masked=True) == 0
    monkeypatch.setenv("PERCEIVERS_NATIVE", "0")  # the rule itself
    assert model.chunk_size is None and model.encoder.cross_attention.chunk_size is None
    with torch.no_grad():
        assert model._stream_size(x) == 32768  # inference: above 32768, a quarter of the input (≥ 32768)
    assert model._stream_size(x) == 0  # autograd: only above 65536
    assert model._stream_size(torch.randn(1, 3, 64, 64)) == 0
    big = torch.randn(1, 3, 272, 272)  # 73984 tokens
    assert model._stream_size(big) == 65536
    model.chunk_size = 0  # off: neither the preprocessor nor the cross-attention streams
    assert model._stream_size(big) == 0 and model.encoder.cross_attention.chunk_size == 0
    model.chunk_size = 1000
    assert model._stream_size(x) == 1000 and model.encoder.cross_attention.chunk_size == 1000
    with pytest.raises(ValueError, match="chunk_size"):
        model.chunk_size = -1
    # wide inputs: chunks of at most 2**21 values over the batch (261 channels: 8034 tokens), ≥ 512
    wide = _model(_pre(grid=(192, 192)))
    wide.input_preprocessor.num_channels = 261
    with torch.no_grad():
        assert wide._stream_size(x) == (1 << 21) // 261
        assert wide._stream_size(x.expand(4, -1, -1, -1)) == (1 << 21) // (4 * 261)
        assert wide._stream_size(x.expand(64, -1, -1, -1)) == 512


def test_decoders_that_read_the_inputs_get_them_whole() -> None:
    assert not decoder_reads_inputs(ClassificationDecoder(3, latent_channels=16))
    assert not decoder_reads_inputs(BasicDecoder(FourierQueries((4, 4), 2), latent_channels=16))
    # queries made of the inputs: read chunk by chunk when independent, whole when they attend each other
    assert not decoder_reads_inputs(FlowDecoder(query_channels=17, latent_channels=16, output_image_shape=(12, 10)))
    assert decoder_reads_inputs(FlowDecoder(query_channels=16, latent_channels=16, output_image_shape=(12, 10),
                                            num_self_attends_per_cross=1, num_self_attention_heads=2))
    assert decoder_reads_inputs(BasicDecoder(TrainableQueries(120, 4), latent_channels=16,
                                             concat_preprocessed_input=True, preprocessed_channels=3))
    assert decoder_reads_inputs(torch.nn.Identity())  # unknown decoders: assume they do

    class Declared(torch.nn.Identity):
        reads_inputs = False

    assert not decoder_reads_inputs(Declared())
    pre = _pre()
    x = torch.randn(1, 3, 12, 10)
    coupled = _model(pre, FlowDecoder(query_channels=pre.num_channels, latent_channels=16, output_image_shape=(12, 10),
                                      num_self_attends_per_cross=1, num_self_attention_heads=1), chunk_size=7)
    assert coupled._stream_size(x) == 0
    assert coupled(x).logits.shape == (1, 12, 10, 2)
    concat = _model(pre, BasicDecoder(TrainableQueries(120, 4), latent_channels=16, output_channels=2,
                                      concat_preprocessed_input=True, preprocessed_channels=3), chunk_size=7)
    assert concat._stream_size(x) == 0
    assert concat(x).logits.shape == (1, 120, 2)


def _flow(size=(12, 10)) -> torch.nn.Module:
    torch.manual_seed(0)
    model = perceivers.create_model("optical-flow-perceiver", train_size=size, num_latents=8, d_latents=16,
                                    num_self_attends_per_block=1, num_self_attention_heads=2, num_bands=3)
    for p in model.parameters():  # the flow output is zero-initialised: give every weight a value
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("patched", [False, True])
def test_flow_streams_its_frames_and_decodes_queries_from_the_stream(patched: bool) -> None:
    from perceivers.io.processors.flow import patches_for_flow

    model = _flow()
    io = model.perceiver
    x = torch.randn(2, 2, 3, 12, 10)
    if patched:
        x = patches_for_flow(x)
    x.requires_grad_(True)
    io.chunk_size = 0
    ref = model(x).flow
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *model.parameters()])
    for tokens, queries in ((20, 7), (30, 120), (50, 33)):  # rows of 10 tokens; query chunks across rows
        io.chunk_size, io.decoder.decoder.chunk_size = tokens, queries
        assert io._stream_size(x) == tokens
        assert isinstance(io.input_preprocessor(x, chunk_size=tokens).inputs, ContextStream)
        out = model(x).flow
        torch.testing.assert_close(out, ref, **TOL)
        for got, want in zip(torch.autograd.grad(out.square().sum(), [x, *model.parameters()]), ref_grads):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("patched", [False, True])
def test_flow_tokens_by_position_equal_the_whole_array(patched: bool) -> None:
    """A frame pair's ``rows(index)`` (gathered by an exported program with a dynamic size): raw frames give each
    token its 3×3 neighbourhood of both frames, zeros beyond the border, as the whole patches; corners included."""
    from perceivers.io.processors.flow import patches_for_flow

    pre = _flow().perceiver.input_preprocessor
    x = torch.randn(2, 2, 3, 12, 10)
    if patched:
        x = patches_for_flow(x)
    whole, stream = pre(x).inputs, pre(x, chunk_size=7).inputs
    index = torch.tensor([0, 9, 110, 119, 55, 10, 19, 0])
    torch.testing.assert_close(stream.rows(index), whole[:, index], atol=1e-6, rtol=1e-6)


def test_flow_at_a_large_size_never_builds_its_tokens_or_patches_whole() -> None:
    model = _flow((64, 64)).eval()
    model.perceiver.chunk_size = model.perceiver.decoder.decoder.chunk_size = 256
    x = torch.randn(1, 2, 3, 64, 64)
    with torch.no_grad(), finite_checks(False), LargestFloatOutput() as probe:
        out = model(x).flow
    tokens = 64 * 64 * model.perceiver.input_preprocessor.num_channels
    patches = 2 * 27 * 64 * 64
    # the largest tensor made is the 8 KiB output (4096 × 2), one chunk's tokens or a 6-row slab of patches
    assert probe.largest <= max(out.numel(), 256 * model.perceiver.input_preprocessor.num_channels, 2 * 27 * 6 * 64)
    assert probe.largest < min(tokens, patches) // 8


def test_fourier_queries_read_a_streams_dtype_and_device() -> None:
    model = _model(decoder=BasicDecoder(FourierQueries((3, 4), 2), latent_channels=16, output_channels=2),
                   chunk_size=7).eval()
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        out = model(x).logits
        model.chunk_size = 0
        torch.testing.assert_close(out, model(x).logits, **TOL)


def test_official_constructor_exposes_chunk_size() -> None:
    model = perceivers.create_model("vision-perceiver-fourier", tiny=True, chunk_size=0)
    assert model.perceiver.chunk_size == 0 and model.config.chunk_size == 0
    model = perceivers.create_model("vision-perceiver-fourier", tiny=True).eval()
    assert model.perceiver.chunk_size is None
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        ref = model(x).logits
        model.perceiver.chunk_size = 30
        assert isinstance(model.perceiver.input_preprocessor(x, chunk_size=30).inputs, ContextStream)
        torch.testing.assert_close(model(x).logits, ref, **TOL)


@pytest.mark.parametrize("grad", [False, True])
def test_large_image_never_exists_as_a_token_array(grad: bool) -> None:
    model = _model(_pre(grid=(128, 128)), chunk_size=1024)
    x = torch.randn(1, 3, 128, 128)
    tokens = 128 * 128 * model.input_preprocessor.num_channels
    with torch.set_grad_enabled(grad), finite_checks(False), LargestFloatOutput() as probe:
        out = model(x).logits
        if grad:
            out.sum().backward()
    # one chunk (8 rows of 128 tokens), padded to 24 channels, at most; the whole array is 10× that
    assert probe.largest <= 1024 * 24 < tokens // 10
    # only the per-axis tables are cached, never the features of the whole grid
    enc = model.input_preprocessor.position_encoding
    assert isinstance(enc, FourierPositionEncoding) and enc._cache
    assert all(key[0] == "axis_tables" for key in enc._cache)


@pytest.mark.slow  # ≈17 s: torch.compile and torch.export of the streamed loop
def test_streamed_model_compiles_and_exports() -> None:
    model = perceivers.create_model("vision-perceiver-fourier", tiny=True, chunk_size=30).eval()
    x = torch.randn(2, 3, 12, 10)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model(pixels).logits

    with torch.no_grad():
        ref = model(x).logits
        torch.testing.assert_close(torch.compile(Logits(), fullgraph=True)(x), ref, **TOL)
    torch.testing.assert_close(torch.export.export(Logits(), (x,)).module()(x), ref, **TOL)
