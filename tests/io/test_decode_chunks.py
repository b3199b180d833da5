"""Large query sets in the DeepMind-family decoders: without query self-attention a :class:`BasicDecoder`
decodes them in chunks (``chunk_size``) against latents prepared once; the result is the whole set's."""

from __future__ import annotations

import pytest
import torch
from memory_probe import LargestFloatOutput

import perceivers
from perceivers.io import BasicDecoder, FourierQueries
from perceivers.layers import ContextStream
from perceivers.validation import finite_checks

TOL = {"atol": 2e-5, "rtol": 1e-4}


def _decoder(**kw) -> BasicDecoder:
    torch.manual_seed(0)
    return BasicDecoder(FourierQueries((20, 30), 3), latent_channels=16, output_channels=4, num_heads=2,
                        widening_factor=2, **kw)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("extra", [{}, {"num_cross_attends": 2}, {"use_query_residual": True}])
def test_chunked_decoding_equals_the_whole_query_set(grad: bool, extra: dict) -> None:
    dec = _decoder(**extra)
    latents = torch.randn(2, 5, 16, requires_grad=grad)
    query = dec.decoder_query(latents)
    mask = torch.rand(2, query.shape[1]) > 0.2
    results = []
    for size in (0, 7, 256):
        dec.chunk_size = size
        latents.grad = None
        dec.zero_grad()
        with torch.set_grad_enabled(grad):
            out = dec(query, latents, query_mask=mask)
            if grad:
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), latents.grad, dec.cross_attention.attn.to_q.weight.grad))
    ref = results[0]
    assert ref[0].shape == (2, 600, 4)
    for got in results[1:]:
        torch.testing.assert_close(got[0], ref[0], **TOL)
        if grad:
            torch.testing.assert_close(got[1], ref[1], **TOL)
            torch.testing.assert_close(got[2], ref[2], **TOL)


def test_query_self_attention_decodes_whole() -> None:
    dec = _decoder(num_self_attends_per_cross=1)
    dec.chunk_size = 7
    latents = torch.randn(1, 5, 16)
    query = dec.decoder_query(latents)
    assert dec._decode_chunk_size(query, latents) == 0
    with torch.no_grad():
        out = dec(query, latents)
        dec.chunk_size = 0
        torch.testing.assert_close(out, dec(query, latents), **TOL)


def test_large_query_set_never_exists_as_whole_intermediates() -> None:
    """40000 queries of 8 channels, 512-wide projections: by default (``chunk_size=None``) no tensor of 40000 × 512
    exists (it did: the whole query set went through the cross-attention and its MLP at once, 2.9 GiB at 1M
    Fourier queries)."""
    torch.manual_seed(0)
    dec = BasicDecoder(None, query_channels=8, latent_channels=512, output_channels=2).eval()
    query, latents = torch.randn(1, 40_000, 8), torch.randn(1, 4, 512)
    with torch.no_grad(), LargestFloatOutput() as probe:
        out = dec(query, latents)
    assert out.shape == (1, 40_000, 2)
    assert probe.largest <= 4096 * 512 * 2 < 40_000 * 512  # one chunk's widest intermediate (GELU's), at most


def test_optical_flow_model_decodes_in_chunks_exactly() -> None:
    model = perceivers.create_model("optical-flow-perceiver", tiny=True).eval()
    x = torch.randn(2, 2, 3, 6, 8)
    inner = model.perceiver.decoder.decoder
    with torch.no_grad(), finite_checks(False):
        ref = model(x).logits
        inner.chunk_size = 5
        torch.testing.assert_close(model(x).logits, ref, **TOL)


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_decoder_chunk_size_is_checked(value) -> None:
    with pytest.raises((TypeError, ValueError), match="chunk_size"):
        _decoder().chunk_size = value


def test_recorded_attention_weights_cover_the_whole_query_set() -> None:
    from perceivers.layers.attention import record_attention

    dec = _decoder()
    dec.chunk_size = 7
    latents = torch.randn(1, 5, 16)
    query = dec.decoder_query(latents)
    with torch.no_grad(), record_attention(dec) as records:
        dec(query, latents)
    assert [tuple(w.shape) for _, w in records] == [(1, 2, 600, 5)]


def test_torch_export_decodes_a_fixed_query_count_in_chunks() -> None:
    """An exported decoder decodes its (fixed) query set chunk by chunk as eager mode does: one cross-attention per
    chunk in the program (it had decoded the whole set at once under torch.export), same outputs."""
    dec = _decoder().eval()
    dec.chunk_size = 100  # 600 queries: 6 chunks

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dec = dec

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return self.dec(self.dec.decoder_query(latents), latents)

    latents = torch.randn(2, 5, 16)
    with torch.no_grad():
        program = torch.export.export(Decode(), (latents,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        attentions = [n for n in program.graph.nodes if "attention" in str(n.target) and n.op == "call_function"]
        assert len(attentions) == 6
        for batch in (1, 3):
            x = torch.randn(batch, 5, 16)
            torch.testing.assert_close(program.module()(x), Decode()(x), **TOL)


@pytest.mark.parametrize("subsampled", [False, True])
def test_streamed_fourier_queries_equal_the_whole_set(subsampled: bool) -> None:
    builder = FourierQueries((4, 5, 6), 3)
    points = torch.randperm(120)[:77] if subsampled else None
    whole = builder(2, subsampled_points=points)
    stream = builder(2, subsampled_points=points, stream=True)
    assert isinstance(stream, ContextStream) and stream.shape == whole.shape
    pieces = [stream.chunk(a, min(a + 13, stream.length)) for a in range(0, stream.length, 13)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=0)
    torch.testing.assert_close(stream.materialize(), whole, rtol=0, atol=0)
    # by position (what an exported program with a symbolic query count gathers): any order, repeats
    index = torch.cat((torch.randperm(stream.length, generator=torch.Generator().manual_seed(0))[:20],
                       torch.tensor([stream.length - 1, 0, 0])))
    torch.testing.assert_close(stream.rows(index), whole[:, index], rtol=0, atol=0)


@pytest.mark.parametrize("length", [None, 9])
@pytest.mark.parametrize("subsampled", [False, True])
def test_streamed_trainable_queries_equal_the_whole_set(subsampled: bool, length: int | None) -> None:
    from perceivers.io import TrainableQueries

    torch.manual_seed(0)
    builder = TrainableQueries(12, 5)
    points = torch.tensor([8, 0, 3, 3, 7]) if subsampled else None
    whole = builder(2, subsampled_points=points, length=length)
    stream = builder(2, subsampled_points=points, length=length, stream=True)
    assert isinstance(stream, ContextStream) and stream.shape == whole.shape
    torch.testing.assert_close(stream.chunk(1, 4), whole[:, 1:4], rtol=0, atol=0)
    torch.testing.assert_close(stream.materialize(), whole, rtol=0, atol=0)
    index = torch.tensor([stream.length - 1, 0, 2, 2])
    torch.testing.assert_close(stream.rows(index), whole[:, index], rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_decoder_takes_a_query_stream(grad: bool) -> None:
    dec = _decoder()
    latents = torch.randn(2, 5, 16, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        dec.chunk_size = 0
        ref = dec(dec.decoder_query(latents), latents)
        want = torch.autograd.grad(ref.square().sum(), latents) if grad else None
        for size in (0, 7, 256):  # 0: the stream is built whole
            dec.chunk_size = size
            out = dec(dec.decoder_query(latents, stream=True), latents)
            torch.testing.assert_close(out, ref, **TOL)
            if grad:
                torch.testing.assert_close(torch.autograd.grad(out.square().sum(), latents), want, **TOL)


def test_multimodal_query_stream_pads_each_modality_as_the_whole_set() -> None:
    from perceivers.io import MultimodalDecoder, TrainableQueries

    torch.manual_seed(0)
    dec = MultimodalDecoder({"a": FourierQueries((3, 7), 2), "b": FourierQueries((11,), 3),
                             "c": TrainableQueries(1, 5)}, latent_channels=16, output_channels=4)
    latents = torch.randn(2, 5, 16)
    points = {"a": torch.randperm(21)[:9]}
    for pts in (None, points):
        whole = dec.decoder_query(latents, subsampled_points=pts)
        stream = dec.decoder_query(latents, subsampled_points=pts, stream=True)
        assert isinstance(stream, ContextStream) and stream.shape == whole.shape
        for step in (1, 4, 10, stream.length):  # chunks within and across the modalities
            pieces = [stream.chunk(a, min(a + step, stream.length)) for a in range(0, stream.length, step)]
            torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=0)


def test_large_fourier_query_set_never_exists_whole() -> None:
    """A PerceiverIOModel decoding the Fourier queries of a 256×256 grid (65536 queries of 66 channels): the
    decoder builds each chunk of queries when it decodes it (the whole set was 17 MiB here, 264 MiB at 1024²)."""
    from perceivers.io import PerceiverEncoder, PerceiverIOModel

    torch.manual_seed(0)
    enc = PerceiverEncoder(input_channels=8, num_latents=4, latent_channels=16, num_self_attends_per_block=1,
                           num_self_attention_heads=2)
    model = PerceiverIOModel(enc, BasicDecoder(FourierQueries((256, 256), 16), latent_channels=16,
                                               output_channels=2)).eval()
    model.decoder.chunk_size = 4096
    x = torch.randn(1, 10, 8)
    with torch.no_grad(), finite_checks(False), LargestFloatOutput() as probe:
        out = model(x).logits
    assert out.shape == (1, 65536, 2)
    assert probe.largest <= max(out.numel(), 4096 * model.decoder._query_width) < 65536 * 66 // 4


def _multimodal_model(output_channels: int = 32):
    """A PerceiverIOModel whose multimodal decoder feeds a projection (a: 600 queries), an audio (b: 40
    patches of 5 samples) and a classification (c: 1 query) postprocessor."""
    from perceivers.io import MultimodalDecoder, PerceiverEncoder, PerceiverIOModel, TrainableQueries
    from perceivers.io.processors import (
        AudioPostprocessor,
        ClassificationPostprocessor,
        MultimodalPostprocessor,
        ProjectionPostprocessor,
    )

    torch.manual_seed(0)
    enc = PerceiverEncoder(input_channels=8, num_latents=5, latent_channels=16, num_self_attends_per_block=1,
                           num_self_attention_heads=2)
    dec = MultimodalDecoder({"a": FourierQueries((20, 30), 3), "b": FourierQueries((40,), 2),
                             "c": TrainableQueries(1, 5)}, latent_channels=16, output_channels=output_channels,
                            num_heads=2)
    post = MultimodalPostprocessor({"a": ProjectionPostprocessor(output_channels, 3),
                                    "b": AudioPostprocessor(output_channels, 5),
                                    "c": ClassificationPostprocessor(output_channels, 7)})
    return PerceiverIOModel(enc, dec, output_postprocessor=post)


def _whole_multimodal(model, x: torch.Tensor, points=None, query_mask=None) -> dict:
    """The reference: the shared decoder's whole output, split and postprocessed."""
    dec, post = model.decoder, model.output_postprocessor
    latents = model(x).last_hidden_state
    query = dec.decoder_query(x, subsampled_points=points)
    dec.decoder.chunk_size = 0
    out = dec(query, latents, query_mask=query_mask)
    return post(out, modality_sizes=dec.output_modality_sizes(points))


@pytest.mark.parametrize("grad", [False, True])
def test_multimodal_outputs_are_postprocessed_chunk_by_chunk_exactly(grad: bool) -> None:
    """Each modality is decoded on its own and its row-wise postprocessor applied per chunk: the outputs and
    gradients equal the whole output's, with and without a query mask and subsampled points."""
    model = _multimodal_model()
    x = torch.randn(2, 10, 8, requires_grad=grad)
    points = {"a": torch.randperm(600)[:77]}
    mask = torch.rand(2, 641) > 0.2
    for pts, qmask in ((None, None), (None, mask), (points, None)):
        with torch.set_grad_enabled(grad):
            ref = _whole_multimodal(model, x, pts, qmask)
            want = torch.autograd.grad(sum(v.square().sum() for v in ref.values()), x) if grad else None
            for size in (0, 7, 256):
                model.decoder.decoder.chunk_size = size
                got = model(x, subsampled_output_points=pts, query_mask=qmask).logits
                assert got.keys() == ref.keys()
                for m in ref:
                    torch.testing.assert_close(got[m], ref[m], **TOL)
                if grad:
                    torch.testing.assert_close(
                        torch.autograd.grad(sum(v.square().sum() for v in got.values()), x), want, **TOL)


def test_multimodal_decoder_output_is_never_whole() -> None:
    """The shared decoder's 64-wide output of all 641 queries (and of the 600 of the largest modality) is never
    built when it decodes in chunks: each chunk goes through its modality's postprocessor as it is decoded."""
    model = _multimodal_model(output_channels=64).eval()
    model.decoder.decoder.chunk_size = 50
    x = torch.randn(1, 10, 8)
    with torch.no_grad(), finite_checks(False), LargestFloatOutput() as probe:
        out = model(x).logits
    assert out["a"].shape == (1, 600, 3) and out["b"].shape == (1, 200) and out["c"].shape == (1, 7)
    assert probe.largest <= 50 * model.decoder.decoder._query_width < 600 * 64


def test_basic_decoder_applies_a_rowwise_postprocessor_per_chunk() -> None:
    from perceivers.io import PerceiverEncoder, PerceiverIOModel
    from perceivers.io.processors import ProjectionPostprocessor

    torch.manual_seed(0)
    enc = PerceiverEncoder(input_channels=8, num_latents=4, latent_channels=16, num_self_attends_per_block=1)
    dec = BasicDecoder(FourierQueries((40, 40), 4), latent_channels=16, output_channels=None)  # 34-wide output
    model = PerceiverIOModel(enc, dec, output_postprocessor=ProjectionPostprocessor(dec.output_channels, 2)).eval()
    x = torch.randn(1, 10, 8)
    with torch.no_grad():
        latents = model(x).last_hidden_state
        dec.chunk_size = 0
        ref = model.output_postprocessor(dec(dec.decoder_query(x), latents))
        dec.chunk_size = 100
        with LargestFloatOutput() as probe:
            out = model(x).logits
    torch.testing.assert_close(out, ref, **TOL)
    assert probe.largest <= max(out.numel(), 100 * dec._query_width) < 1600 * dec.output_channels


def test_a_postprocessor_with_its_own_forward_gets_the_whole_output() -> None:
    """A subclass that overrides ``forward`` is not split into its row-wise parts."""
    from perceivers.io.processors import ProjectionPostprocessor, rowwise_parts

    class Scaled(ProjectionPostprocessor):
        def forward(self, x):
            return 2 * super().forward(x)

    assert rowwise_parts(ProjectionPostprocessor(4, 2)) is not None
    assert rowwise_parts(Scaled(4, 2)) is None and rowwise_parts(None) is None
