"""DeepMind-style decoders with a deeper stack: ``num_cross_attends`` and ``num_self_attends_per_cross``."""

from __future__ import annotations

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
    TrainableQueries,
    VideoAutoencodingDecoder,
    couples_queries,
)

D, Q, C = 16, 6, 8  # latent width, queries, query width


def _decoder(seed: int = 0, **kw) -> BasicDecoder:
    torch.manual_seed(seed)
    return BasicDecoder(TrainableQueries(Q, C), latent_channels=D, output_channels=3, num_heads=2, **kw).eval()


def _model(decoder: nn.Module, seed: int = 0) -> PerceiverIOModel:
    torch.manual_seed(seed)
    encoder = PerceiverEncoder(12, num_latents=4, latent_channels=D, num_self_attends_per_block=1,
                               num_self_attention_heads=2)
    return PerceiverIOModel(encoder, decoder).eval()


def _latents(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, D, generator=torch.Generator().manual_seed(seed))


def _zero_out(block: nn.Module) -> None:
    for lin in (block.attn.to_out, block.mlp.fc2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def test_defaults_keep_state_dict_keys_and_init() -> None:
    default, deep = _decoder(), _decoder(num_cross_attends=3, num_self_attends_per_cross=2)
    keys = set(default.state_dict())
    assert {k.split(".")[0] for k in keys} == {"queries", "cross_attention", "output"}
    assert len(keys) == 21  # as before the deeper decoder existed (checked against the previous commit)
    deep_sd = deep.state_dict()  # the new modules draw their random numbers last
    assert all(torch.equal(v, deep_sd[k]) for k, v in default.state_dict().items())
    assert len(deep.extra_cross_attentions) == 2 and len(deep.self_attends) == 6
    assert not couples_queries(default) and couples_queries(deep)
    assert couples_queries(ClassificationDecoder(3, latent_channels=D, num_self_attends_per_cross=1))


def test_zeroed_extra_blocks_equal_the_one_layer_decoder() -> None:
    shallow, deep = _decoder(), _decoder(num_cross_attends=3, num_self_attends_per_cross=2)
    for block in (*deep.extra_cross_attentions, *deep.self_attends):
        _zero_out(block)
    query, latents = shallow.decoder_query(torch.zeros(2, 1, 1)), _latents()
    mask = torch.tensor([[True] * Q, [True] * 4 + [False] * 2])
    with torch.no_grad():
        assert torch.equal(deep(query, latents, query_mask=mask), shallow(query, latents, query_mask=mask))


def test_deep_decoder_equals_manual_chain_of_its_blocks() -> None:
    dec = _decoder(num_cross_attends=2, num_self_attends_per_cross=1, use_query_residual=True)
    query, latents = dec.decoder_query(torch.zeros(2, 1, 1)), _latents()
    mask = torch.tensor([[True] * Q, [True, False, True, True, False, True]])
    with torch.no_grad():
        x = dec.cross_attention(query, latents, query_mask=mask)
        x = dec.self_attends[0](x, mask=mask)
        extra = dec.extra_cross_attentions[0]  # a residual block, written out from its parts
        x = x + extra.attn(extra.norm_q(x), extra.norm_kv(latents), query_mask=mask)
        x = x + extra.mlp(extra.norm_mlp(x))
        block = dec.self_attends[1]
        x = x + block.attn(block.norm(x), mask=mask)
        x = x + block.mlp(block.norm_mlp(x))
        torch.testing.assert_close(dec(query, latents, query_mask=mask), dec.output(x), atol=1e-5, rtol=1e-5)


def test_masked_queries_do_not_change_the_others() -> None:
    dec = _decoder(num_cross_attends=2, num_self_attends_per_cross=2)
    query, latents = dec.decoder_query(torch.zeros(2, 1, 1)), _latents()
    mask = torch.tensor([[True, True, False, True, False, True], [False, True, True, True, True, False]])
    other = torch.where(mask[..., None], query, 3 * torch.randn_like(query))
    with torch.no_grad():
        a, b = dec(query, latents, query_mask=mask), dec(other, latents, query_mask=mask)
        unmasked = dec(other, latents)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[mask], unmasked[mask], atol=1e-3)  # the queries do interact


def test_subsampled_decoding_equals_whole_without_self_attention() -> None:
    model = _model(_decoder(num_cross_attends=3))
    x, points = torch.randn(2, 5, 12), torch.tensor([4, 0, 2])
    with torch.no_grad():
        whole = model(x).logits
        torch.testing.assert_close(model(x, subsampled_output_points=points).logits, whole[:, points],
                                   atol=1e-6, rtol=1e-6)


def test_subsampled_decoding_is_refused_with_self_attention() -> None:
    model = _model(_decoder(num_self_attends_per_cross=1))
    x = torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match="query self-attention.*decode the whole query set"):
        model(x, subsampled_output_points=torch.arange(3))
    queries = {"a": FourierQueries((5,), 2), "b": TrainableQueries(3, 4)}
    multi = _model(MultimodalDecoder(queries, latent_channels=D, output_channels=3, num_self_attends_per_cross=1))
    with pytest.raises(ValueError, match=r"\(for \['a'\]\)"):
        multi(x, subsampled_output_points={"a": torch.arange(2), "b": None})
    out = multi(x, subsampled_output_points={"a": None, "b": None}).logits  # every entry None: the whole set
    assert out.shape == (2, 8, 3)


def test_model_reports_every_decoder_attention() -> None:
    model = _model(_decoder(num_cross_attends=2, num_self_attends_per_cross=1))
    out = model(torch.randn(2, 5, 12), output_attentions=True)
    assert [w.shape for w in out.cross_attentions] == [(2, 1, 4, 5), (2, 2, Q, 4), (2, 2, Q, 4)]
    assert [w.shape for w in out.decoder_self_attentions] == [(2, 2, Q, Q)] * 2
    assert _model(_decoder()).forward(torch.randn(2, 5, 12), output_attentions=True).decoder_self_attentions is None


def test_gradients_reach_every_new_parameter() -> None:
    model = _model(_decoder(num_cross_attends=2, num_self_attends_per_cross=1)).train()
    model(torch.randn(2, 5, 12), query_mask=torch.ones(2, Q, dtype=torch.bool)).logits.square().mean().backward()
    for name, p in model.decoder.named_parameters():
        if name.startswith(("extra_cross_attentions", "self_attends")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deep_decoder_trains() -> None:
    model = _model(_decoder(num_cross_attends=2, num_self_attends_per_cross=1)).train()
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(3))
    target = torch.cat([x.mean(1)[:, None, :3].expand(-1, Q - 1, -1), x.amax(1)[:, None, :3]], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (model(x).logits - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_wrappers_pass_the_depth_on_and_save() -> None:
    deep = {"num_cross_attends": 2, "num_self_attends_per_cross": 1, "num_self_attention_heads": 1}
    latents = _latents()
    cls = ClassificationDecoder(5, latent_channels=D, **deep)
    assert cls(cls.decoder_query(latents), latents).shape == (2, 5)
    flow = FlowDecoder(query_channels=C, latent_channels=D, output_image_shape=(2, 3), **deep)
    assert flow(flow.decoder_query(torch.randn(2, 6, C)), latents).shape == (2, 2, 3, 2)
    video = VideoAutoencodingDecoder((2, 2, 2), latent_channels=D, output_channels=3, num_bands=2, **deep)
    assert video(video.decoder_query(latents), latents).shape == (2, 2, 2, 2, 3)
    for dec in (cls, flow, video):
        assert len(dec.decoder.extra_cross_attentions) == 1 and len(dec.decoder.self_attends) == 2


def test_deep_composition_saves_and_loads(tmp_path) -> None:
    model = _model(_decoder(num_cross_attends=2, num_self_attends_per_cross=1))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert len(loaded.decoder.self_attends) == 2


@pytest.mark.parametrize(("kw", "match"), [
    ({"num_cross_attends": 0}, "num_cross_attends must be an int >= 1, got 0"),
    ({"num_cross_attends": 1.5}, "num_cross_attends must be an int >= 1, got 1.5"),
    ({"num_self_attends_per_cross": -1}, "num_self_attends_per_cross must be an int >= 0, got -1"),
    ({"num_self_attends_per_cross": 1, "num_self_attention_heads": 3},
     "query_channels=8 must be divisible by num_self_attention_heads=3"),
])
def test_bad_depths_are_refused(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        _decoder(**kw)
