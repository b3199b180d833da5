"""PerceiverIO's deeper decoder: ``decoder_depth`` cross-attentions, ``decoder_self_attends`` query self-attentions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import perceivers
from perceivers.models import perceiver_io

KW = {"dim": 16, "queries_dim": 8, "logits_dim": 4, "depth": 1, "num_latents": 6, "latent_dim": 16,
      "latent_heads": 2, "latent_dim_head": 8, "cross_dim_head": 8}


def _model(seed: int = 0, **kw) -> perceivers.PerceiverIO:
    torch.manual_seed(seed)
    return perceivers.PerceiverIO(**{**KW, **kw}).eval()


def _inputs(seed: int = 1, m: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 10, 16, generator=g), torch.randn(2, m, 8, generator=g)


def _zero_out(block: nn.Module) -> None:
    """Zero what a residual block adds: the attention's and the MLP's output projections."""
    for lin in (block.attn.to_out, *([block.mlp.fc2] if block.mlp is not None else [])):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def test_defaults_keep_state_dict_keys_and_init() -> None:
    default, deep = _model(), _model(decoder_depth=3, decoder_self_attends=2)
    keys = set(default.state_dict())
    assert not any(k.startswith(("decoder_extra_cross_attns", "decoder_self_attns")) for k in keys)
    assert {k for k in keys if k.startswith("decoder")} == {
        f"decoder_cross_attn.{k}" for k in ("norm_q.weight", "norm_q.bias", "norm_kv.weight", "norm_kv.bias",
                                            "attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight",
                                            "attn.to_out.weight", "attn.to_out.bias")}
    assert len(keys) == 40  # as before the deeper decoder existed (checked against the previous commit)
    # the new modules draw their random numbers last: the shared ones are initialised identically
    deep_sd = deep.state_dict()
    assert all(torch.equal(v, deep_sd[k]) for k, v in default.state_dict().items())
    assert len(deep.decoder_extra_cross_attns) == 2 and len(deep.decoder_self_attns) == 6


def test_default_decoder_is_one_cross_attention_then_logits() -> None:
    model = _model()
    data, queries = _inputs()
    latents = model(data)
    want = model.to_logits(model.decoder_cross_attn(queries, latents))
    torch.testing.assert_close(model(data, queries=queries), want, rtol=0, atol=0)


def test_zeroed_extra_blocks_equal_the_one_layer_decoder() -> None:
    shallow, deep = _model(decoder_ff=True), _model(decoder_ff=True, decoder_depth=3, decoder_self_attends=2)
    for block in (*deep.decoder_extra_cross_attns, *deep.decoder_self_attns):
        _zero_out(block)
    data, queries = _inputs()
    with torch.no_grad():
        assert torch.equal(deep(data, queries=queries), shallow(data, queries=queries))


def test_deep_decoder_equals_manual_chain_of_its_blocks() -> None:
    model = _model(decoder_ff=True, decoder_depth=2, decoder_self_attends=2)
    data, queries = _inputs()
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        latents = model(data)
        x = model.decoder_cross_attn(queries, latents)
        for block in model.decoder_self_attns[:2]:
            x = block(x, mask=mask)
        # the second cross-attention as a residual block, written out from its parts
        extra = model.decoder_extra_cross_attns[0]
        x = x + extra.attn(extra.norm_q(x), extra.norm_kv(latents))
        x = x + extra.mlp(extra.norm_mlp(x))
        for block in model.decoder_self_attns[2:]:
            a = block.attn(block.norm(x), block.norm(x), mask=mask)
            x = x + a
            x = x + block.mlp(block.norm_mlp(x))
        want = model.to_logits(x)
        torch.testing.assert_close(model(data, queries=queries, query_mask=mask), want, atol=1e-5, rtol=1e-5)


def test_masked_queries_do_not_change_the_others() -> None:
    model = _model(decoder_depth=2, decoder_self_attends=1)
    data, queries = _inputs()
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    other = torch.where(mask[..., None], queries, torch.randn_like(queries) * 5)
    with torch.no_grad():
        a = model(data, queries=queries, query_mask=mask)
        b = model(data, queries=other, query_mask=mask)
        unmasked = model(data, queries=other)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[mask], unmasked[mask], atol=1e-3)  # without the mask they do: queries interact


def test_query_mask_changes_nothing_without_self_attention() -> None:
    model = _model(decoder_depth=2)
    data, queries = _inputs()
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    with torch.no_grad():
        assert torch.equal(model(data, queries=queries, query_mask=mask), model(data, queries=queries))


def test_perceiver_lm_hides_padding_from_query_self_attention() -> None:
    torch.manual_seed(0)
    lm = perceivers.PerceiverLM(num_tokens=20, dim=16, depth=1, max_seq_len=8, num_latents=4, latent_dim=16,
                                latent_heads=2, latent_dim_head=8, decoder_self_attends=1).eval()
    ids = torch.randint(0, 20, (2, 8))
    mask = torch.arange(8)[None] < torch.tensor([[5], [8]])
    other = torch.where(mask, ids, (ids + 7) % 20)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, mask)[mask], lm(other, mask)[mask], atol=1e-5, rtol=1e-5)


def test_chunked_decoding_equals_whole_without_self_attention() -> None:
    model = _model(decoder_ff=True, decoder_depth=3)
    data, queries = _inputs(m=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        whole = model(data, queries=queries)
        model.decode_chunk_size = 3
        chunked = model(data, queries=queries, query_mask=mask)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_self_attention_refuses_explicit_chunks_and_ignores_automatic_ones(monkeypatch) -> None:
    with pytest.raises(ValueError, match="decoder_self_attends=1.*decode_chunk_size=None or 0"):
        _model(decoder_self_attends=1, decode_chunk_size=4)
    model = _model(decoder_self_attends=1)
    data, queries = _inputs(m=7)
    with torch.no_grad():
        whole = model(data, queries=queries)
        model.decode_chunk_size = 2  # set after construction: refused when decoding
        with pytest.raises(ValueError, match="independent chunks"):
            model(data, queries=queries)
        model.decode_chunk_size = None
        # automatic chunking (above 65536 queries) would apply: the stack still runs once, on all queries
        monkeypatch.setattr(perceiver_io, "auto_chunk_size", lambda n, size, **kw: 2 if n == 7 else 0)  # the 7 queries, not the 10 inputs
        calls = []
        decode = model._decode
        monkeypatch.setattr(model, "_decode", lambda *a, **kw: calls.append(a[0].shape[1]) or decode(*a, **kw))
        torch.testing.assert_close(model(data, queries=queries), whole, atol=0, rtol=0)
    assert calls == [7]


def test_gradients_reach_every_new_parameter() -> None:
    model = _model(decoder_ff=True, decoder_depth=2, decoder_self_attends=1).train()
    data, queries = _inputs()
    model(data, queries=queries, query_mask=torch.ones(2, 5, dtype=torch.bool)).square().mean().backward()
    for name, p in model.named_parameters():
        if name.startswith(("decoder_extra_cross_attns", "decoder_self_attns")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deep_decoder_trains() -> None:
    model = _model(decoder_depth=2, decoder_self_attends=1, logits_dim=1).train()
    data, queries = _inputs(m=6)
    target = queries.sum(-1, keepdim=True).sin() + data.mean((1, 2))[:, None, None]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (model(data, queries=queries) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize(("kw", "match"), [
    ({"decoder_depth": 0}, "decoder_depth must be an int >= 1, got 0"),
    ({"decoder_depth": -2}, "decoder_depth must be an int >= 1, got -2"),
    ({"decoder_depth": 2.0}, "decoder_depth must be an int >= 1, got 2.0"),
    ({"decoder_depth": True}, "decoder_depth must be an int >= 1, got True"),
    ({"decoder_self_attends": -1}, "decoder_self_attends must be an int >= 0, got -1"),
])
def test_bad_depths_are_refused(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        perceivers.PerceiverIO(**{**KW, **kw})


def test_bad_query_masks_are_refused() -> None:
    model = _model(decoder_self_attends=1)
    data, queries = _inputs()
    with pytest.raises(ValueError, match="query_mask needs queries"):
        model(data, query_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query_mask must have shape \[batch=2, 5\]"):
        model(data, queries=queries, query_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("self_attends", [0, 1])
def test_zero_queries_give_an_empty_output(self_attends: int) -> None:
    """No queries, no outputs: ``[B, 0, logits_dim]`` with or without the queries' self-attention (with it, the
    attention dispatch divided by zero)."""
    x, _ = _inputs()
    with torch.no_grad():
        out = _model(decoder_self_attends=self_attends)(x, queries=torch.randn(0, 8))
    assert out.shape == (2, 0, 4)


def test_chunked_decoding_keeps_one_copy_of_the_output() -> None:
    """Without autograd the chunks are written into the output: the chunks and their concatenation were alive
    together (2× the output; 1M queries of 32 channels: 325 MiB peak for a 128 MiB output)."""
    from memory_probe import PeakLiveFloat

    torch.manual_seed(0)
    model = perceivers.PerceiverIO(dim=8, queries_dim=8, logits_dim=64, depth=1, num_latents=4, latent_dim=16,
                                   latent_heads=2, latent_dim_head=8, cross_dim_head=8, decode_chunk_size=500).eval()
    data, queries = torch.randn(1, 10, 8), torch.randn(20_000, 8)
    output_bytes = 20_000 * 64 * 4
    with torch.no_grad(), PeakLiveFloat() as probe:
        out = model(data, queries=queries)
    assert probe.peak < 1.25 * output_bytes
    with torch.no_grad():
        model.decode_chunk_size = 0
        torch.testing.assert_close(out, model(data, queries=queries), atol=2e-5, rtol=1e-4)
