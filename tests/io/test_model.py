"""perceivers.io: encoder, decoders, query builders, positions and the composed model."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from perceivers.io import (
    BasicDecoder,
    ClassificationDecoder,
    FlowDecoder,
    FourierQueries,
    MultimodalDecoder,
    PerceiverEncoder,
    PerceiverIOModel,
    ProjectionDecoder,
    TrainableGridPositions,
    TrainableQueries,
    VideoAutoencodingDecoder,
    build_position_encoding,
    init_like_haiku,
    subsampled_positions,
)
from perceivers.io.processors import ImagePreprocessor


def _encoder(**kw) -> PerceiverEncoder:
    args = {"num_latents": 4, "latent_channels": 16, "num_blocks": 2, "num_self_attends_per_block": 2,
                "num_self_attention_heads": 2}
    return PerceiverEncoder(6, **{**args, **kw}).eval()


# ------------------------------------------------------------------------------------------ positions


@pytest.mark.parametrize(
    "shape,bands,max_res,channels,total,total_abs",
    [
        # anchors computed with DeepMind's generate_fourier_features (official.md §4.3)
        ((224, 224), 64, None, 258, 14834.31, 8239034.3),
        ((56, 56), 64, None, 258, -1060.25, 513915.2),
        ((16, 56, 56), 32, None, 195, -19595.15, 6211573.6),
        ((1920,), 192, (30720,), 385, -51.93, 470462.3),
        pytest.param((368, 496), 64, None, 258, 17439.37, 29942014.1, marks=pytest.mark.slow),
    ],
)
def test_fourier_features_match_official_anchors(shape, bands, max_res, channels, total, total_abs) -> None:
    enc = build_position_encoding("fourier", num_dims=len(shape), index_shape=shape, num_bands=bands,
                                  max_resolution=max_res)
    feats = enc(shape)
    assert enc.num_channels == channels and feats.shape == (math.prod(shape), channels)
    # float32 sin/cos of arguments up to ~5e4 rad differ between XLA and torch by a few ulps
    assert abs(float(feats.sum(dtype=torch.float64)) - total) <= 2e-6 * total_abs + 0.05
    assert abs(float(feats.abs().sum(dtype=torch.float64)) - total_abs) <= 2e-6 * total_abs


def test_subsampled_positions_formula() -> None:
    pos = subsampled_positions(torch.tensor([0, 4, 5]), (2, 3))
    expected = torch.tensor([[-1.0, -1.0], [0.0, -1 + 2 / 3], [0.0, -1 + 4 / 3]])
    torch.testing.assert_close(pos, expected)


def test_fourier_queries_full_grid_differs_from_subsampled() -> None:
    q = FourierQueries((3, 4), num_bands=2, max_resolution=(3, 4))
    full = q(2)
    sub = q(2, subsampled_points=torch.arange(12))
    assert full.shape == sub.shape == (2, 12, q.num_channels)
    torch.testing.assert_close(full[0, :, :2][0], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(full[0, -1, :2], torch.tensor([1.0, 1.0]))  # linspace reaches +1
    torch.testing.assert_close(sub[0, -1, :2], torch.tensor([1 / 3, 0.5]))  # -1 + 2·idx/N does not
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        q(1, subsampled_points=torch.tensor([12]))


def test_trainable_queries_length_and_points() -> None:
    q = TrainableQueries(5, 3)
    assert q(2).shape == (2, 5, 3)
    assert torch.equal(q(2, length=2)[1], q.table.embeddings[:2])
    assert torch.equal(q(1, subsampled_points=torch.tensor([4, 0]))[0], q.table.embeddings[[4, 0]])


def test_trainable_queries_points_lie_within_length() -> None:
    q = TrainableQueries(5, 3)
    both = q(2, subsampled_points=torch.tensor([2, 0]), length=3)  # points among the first 3 rows
    assert torch.equal(both[1], q.table.embeddings[[2, 0]])
    with pytest.raises(ValueError, match=re.escape("subsampled_points (with length=3) must lie in [0, 3), got [0, 4]")):
        q(1, subsampled_points=torch.tensor([0, 4]), length=3)
    with pytest.raises(ValueError, match=re.escape("length must be in [1, 5], got 6")):
        q(1, subsampled_points=torch.tensor([0]), length=6)


def test_trainable_grid_positions_refuse_another_index_shape() -> None:
    pos = TrainableGridPositions((4, 5), 3)
    assert torch.equal(pos((4, 5)), pos.table.embeddings)
    assert torch.equal(pos.grid_rows((4, 5), 2, 7), pos.table.embeddings[2:7])
    for other in [(5, 4), (20,), (2, 2, 5)]:  # as many positions, but rows on other pixels
        with pytest.raises(ValueError, match=re.escape(f"built for index shape (4, 5) (20 positions), got {other}")):
            pos(other)
    pre = ImagePreprocessor("pixels", position_encoding=pos, spatial_downsample=1)
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(pre(x).inputs[..., 3:], pos.table.embeddings.expand(2, -1, -1))
    with pytest.raises(ValueError, match=re.escape("built for index shape (4, 5) (20 positions), got (5, 4)")):
        pre(x.transpose(-1, -2))  # H and W swapped


# ------------------------------------------------------------------------------------------ encoder


def test_encoder_shares_weights_across_blocks() -> None:
    one, three = _encoder(num_blocks=1), _encoder(num_blocks=3)
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in three.parameters())
    three.load_state_dict(one.state_dict())
    x = torch.randn(2, 7, 6)
    z = one.cross_attention(one.latents(2), x)
    for _ in range(3):
        for layer in one.self_attends:
            z = layer(z)
    torch.testing.assert_close(three(x), z)


def test_encoder_cross_attention_widths() -> None:
    kv = _encoder()
    assert kv.cross_attention.attn.qk_channels == 6  # DeepMind's shape_for_attn='kv'
    q = _encoder(cross_attention_shape_for_attn="q")
    assert q.cross_attention.attn.qk_channels == 16
    explicit = _encoder(qk_channels=8, v_channels=16)
    assert explicit.cross_attention.attn.qk_channels == 8 and explicit.self_attends[0].attn.qk_channels == 8


def test_encoder_mask_equals_dropping_tokens() -> None:
    enc = _encoder()
    x = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 6:] = False
    torch.testing.assert_close(enc(x, mask=mask), enc(x[:, :6]), rtol=1e-5, atol=1e-6)


@given(st.permutations(list(range(8))))
def test_encoder_is_permutation_invariant(perm: list[int]) -> None:
    torch.manual_seed(0)
    enc = _encoder()
    x = torch.randn(1, 8, 6)
    torch.testing.assert_close(enc(x[:, perm]), enc(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ decoders


def test_basic_decoder_zeroes_masked_queries() -> None:
    torch.manual_seed(0)
    dec = BasicDecoder(TrainableQueries(4, 8), latent_channels=16, output_channels=3).eval()
    q = dec.decoder_query(torch.randn(2, 5, 6))
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    a = dec(q, torch.randn(2, 4, 16), query_mask=mask)
    b = dec(q, torch.randn(2, 4, 16), query_mask=mask)
    torch.testing.assert_close(a[0, 2:], b[0, 2:])  # independent of the latents
    assert not torch.allclose(a[1], b[1])
    attn = dec.cross_attention
    zero = attn.attn.to_out.bias  # attention output of a masked row
    expected = zero + attn.mlp(attn.norm_mlp(zero))
    torch.testing.assert_close(a[0, 2], dec.output(expected))


def test_decoder_output_shapes() -> None:
    latents = torch.randn(2, 4, 16)
    inputs = torch.randn(2, 12, 10)
    cls = ClassificationDecoder(7, latent_channels=16)
    assert cls(cls.decoder_query(inputs), latents).shape == (2, 7)
    proj = ProjectionDecoder(7, latent_channels=16)
    assert torch.equal(proj(proj.decoder_query(inputs), latents), torch.zeros(2, 7))
    flow = FlowDecoder(query_channels=10, latent_channels=16, output_image_shape=(3, 4))
    assert flow(flow.decoder_query(inputs), latents).shape == (2, 3, 4, 2)
    video = VideoAutoencodingDecoder((2, 3, 4), latent_channels=16, output_channels=5, num_bands=2)
    assert video(video.decoder_query(inputs), latents).shape == (2, 2, 3, 4, 5)
    sub = video.decoder_query(inputs, subsampled_points=torch.arange(5))
    assert video(sub, latents).shape == (2, 5, 5)


def test_video_decoder_keeps_subsampled_outputs_in_point_order() -> None:
    torch.manual_seed(0)
    video = VideoAutoencodingDecoder((2, 3, 4), latent_channels=16, output_channels=5, num_bands=2).eval()
    model = PerceiverIOModel(PerceiverEncoder(6, num_latents=4, latent_channels=16, num_self_attention_heads=2),
                             video).eval()
    x, perm = torch.randn(2, 7, 6), torch.randperm(24)
    with torch.no_grad():
        assert model(x).logits.shape == (2, 2, 3, 4, 5)  # the full grid
        ordered = model(x, subsampled_output_points=torch.arange(24)).logits
        permuted = model(x, subsampled_output_points=perm).logits
        assert ordered.shape == permuted.shape == (2, 24, 5)  # all the points, yet no grid: [B, Q, C]
        torch.testing.assert_close(permuted, ordered[:, perm])
        latents = torch.randn(2, 4, 16)
        query = video.decoder_query(x, subsampled_points=perm)
        assert video(query, latents, subsampled_points=perm).shape == (2, 24, 5)


def test_multimodal_decoder_pads_in_sorted_order() -> None:
    dec = MultimodalDecoder(
        {"label": TrainableQueries(1, 6), "audio": FourierQueries((4,), 1, (16,))},
        latent_channels=16, output_channels=5, min_padding_size=2,
    )
    assert dec.query_channels == 8 and dec.modalities == ["audio", "label"]
    points = {"audio": torch.tensor([1, 3])}
    q = dec.decoder_query(torch.randn(2, 3, 9), subsampled_points=points)
    assert q.shape == (2, 3, 8)
    torch.testing.assert_close(q[0, 2, :6], dec.queries["label"].table.embeddings[0])
    torch.testing.assert_close(q[1, 0, 3:], dec.padding["audio"].embeddings[0])
    assert dec.output_modality_sizes(points) == {"audio": 2, "label": 1}
    assert dec(q, torch.randn(2, 4, 16)).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="unknown modalities"):
        dec.decoder_query(torch.randn(2, 3, 9), subsampled_points={"video": torch.arange(2)})


# ------------------------------------------------------------------------------------------ composed model


def _tiny_model() -> PerceiverIOModel:
    pos = build_position_encoding("fourier", num_dims=2, num_bands=2, max_resolution=(4, 4))
    pre = ImagePreprocessor("conv1x1", position_encoding=pos, spatial_downsample=1, num_channels=4)
    enc = PerceiverEncoder(pre.num_channels, num_latents=3, latent_channels=8, num_self_attends_per_block=1,
                           num_self_attention_heads=2)
    return PerceiverIOModel(enc, ClassificationDecoder(5, latent_channels=8), input_preprocessor=pre)


def test_model_backward_reaches_every_parameter() -> None:
    model = init_like_haiku(_tiny_model())
    out = model(torch.randn(2, 3, 4, 4))
    assert out.logits.shape == (2, 5) and out.last_hidden_state.shape == (2, 3, 8)
    out.logits.square().sum().backward()
    # A key bias cancels in the softmax: attentions that fold (Attention.fold_kv) give it an exact 0.
    cross = {"encoder.cross_attention.attn": (3, 16), "decoder.decoder.cross_attention.attn": (1, 3)}  # (queries, keys)
    folded = {f"{n}.to_k.bias" for n, m in model.named_modules()
              if n in cross and m.folds(num_queries=cross[n][0], length=cross[n][1])}
    assert folded  # both fold: 14-channel inputs and 8-channel latents against few queries
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not (p.grad.abs().sum() > 0 or (n in folded and not p.grad.any()))]
    assert not missing, missing


def test_decode_chunks_encodes_once_and_decodes_each_chunk_as_forward() -> None:
    torch.manual_seed(0)
    pos = build_position_encoding("fourier", num_dims=2, num_bands=2, max_resolution=(4, 4))
    pre = ImagePreprocessor("conv1x1", position_encoding=pos, spatial_downsample=1, num_channels=4)
    enc = PerceiverEncoder(pre.num_channels, num_latents=3, latent_channels=8, num_self_attention_heads=2)
    queries = FourierQueries((4, 4), num_bands=2)
    model = PerceiverIOModel(enc, BasicDecoder(queries, latent_channels=8, output_channels=2),
                             input_preprocessor=pre).eval()
    images, chunks = torch.randn(2, 3, 4, 4), [torch.arange(0, 6), torch.tensor([15, 3]), torch.arange(6, 16)]
    calls = []
    enc.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        parts = list(model.decode_chunks(images, chunks))
        assert len(calls) == 1
        for points, part in zip(chunks, parts, strict=True):
            torch.testing.assert_close(part, model(images, subsampled_output_points=points).logits, rtol=0, atol=0)
    assert list(model.decode_chunks(images, [])) == [] and len(calls) == 4  # nothing to decode: no encoding
    coupled = PerceiverIOModel(PerceiverEncoder(5, num_latents=2, latent_channels=4, num_self_attention_heads=1),
                               BasicDecoder(TrainableQueries(6, 8), latent_channels=4, num_self_attends_per_cross=1,
                                            num_self_attention_heads=2))
    with pytest.raises(ValueError, match="query self-attention"):
        next(coupled.decode_chunks(torch.randn(1, 7, 5), [torch.arange(3)]))


def test_model_checks_widths_and_raw_inputs() -> None:
    pre = ImagePreprocessor("pixels", position_encoding=None, spatial_downsample=1)
    with pytest.raises(ValueError, match="preprocessor gives 3 channels"):
        PerceiverIOModel(PerceiverEncoder(5, num_latents=2, latent_channels=4, num_self_attention_heads=1),
                         ClassificationDecoder(2, latent_channels=4), input_preprocessor=pre)
    bare = PerceiverIOModel(PerceiverEncoder(5, num_latents=2, latent_channels=4, num_self_attention_heads=1),
                            ClassificationDecoder(2, latent_channels=4))
    assert bare(torch.randn(3, 7, 5)).logits.shape == (3, 2)
    with pytest.raises(ValueError, match=r"\[batch, tokens, channels\]"):
        bare(torch.randn(3, 5))
    with pytest.raises(TypeError, match=r"floating-point tensor \[batch, tokens, channels\].*got dtype torch.int64"):
        bare(torch.randint(0, 3, (3, 7, 5)))


def test_basic_decoder_names_query_and_latent_widths() -> None:
    dec = BasicDecoder(TrainableQueries(6, 8), latent_channels=16, output_channels=3)
    assert dec(torch.randn(2, 6, 8), torch.randn(2, 4, 16)).shape == (2, 6, 3)
    with pytest.raises(ValueError, match=re.escape("decoder query must be [batch, n, 8], got (2, 6, 7)")):
        dec(torch.randn(2, 6, 7), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=re.escape("decoder latents must be [batch, n, 16], got (2, 4, 15)")):
        dec(torch.randn(2, 6, 8), torch.randn(2, 4, 15))


def test_init_like_haiku() -> None:
    torch.manual_seed(0)
    flow = init_like_haiku(FlowDecoder(query_channels=400, latent_channels=16, output_image_shape=(2, 2)))
    assert torch.count_nonzero(flow.decoder.output.weight) == 0
    w = flow.decoder.cross_attention.attn.to_q.weight.detach()  # Linear(400 → 16): σ = 1/√400 before truncation
    assert 0.04 < float(w.std()) < 0.05 and float(w.abs().max()) <= 2 / 20 + 1e-6
    assert torch.count_nonzero(flow.decoder.cross_attention.attn.to_q.bias) == 0
