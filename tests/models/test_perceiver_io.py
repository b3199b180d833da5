"""PerceiverIO and PerceiverLM: shapes, queries, tying, sequence dropout, language-model behaviour."""

from __future__ import annotations

import pytest
import torch

from perceivers import PerceiverIO, PerceiverLM
from perceivers.models.perceiver_io import dropout_seq

KW = {
    "depth": 2,
    "dim": 10,
    "queries_dim": 12,
    "logits_dim": 7,
    "num_latents": 6,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}
LM_KW = {
    "num_tokens": 11,
    "dim": 12,
    "max_seq_len": 10,
    "depth": 2,
    "num_latents": 5,
    "latent_dim": 16,
    "latent_heads": 2,
    "cross_dim_head": 8,
    "latent_dim_head": 8,
}


def make(**overrides) -> PerceiverIO:
    return PerceiverIO(**{**KW, **overrides}).eval()


def test_shapes_with_and_without_queries():
    model = make()
    data = torch.randn(2, 9, 10)
    assert model(data, queries=torch.randn(4, 12)).shape == (2, 4, 7)
    assert model(data, queries=torch.randn(2, 4, 12)).shape == (2, 4, 7)
    # without queries: the latents, and logits_dim does not apply (as in perceiver-pytorch)
    assert model(data).shape == (2, 6, 16)
    assert make(logits_dim=None)(data, queries=torch.randn(4, 12)).shape == (2, 4, 12)


def test_2d_queries_are_shared_by_the_batch():
    model = make(decoder_ff=True)
    data, q = torch.randn(3, 9, 10), torch.randn(4, 12)
    torch.testing.assert_close(model(data, queries=q), model(data, queries=q.expand(3, -1, -1)))


def test_return_hiddens():
    model = make(depth=3)
    out, hiddens = model(torch.randn(2, 9, 10), queries=torch.randn(4, 12), return_hiddens=True)
    assert out.shape == (2, 4, 7) and len(hiddens) == 4
    latents, hiddens2 = model(torch.randn(2, 9, 10), return_hiddens=True)
    assert latents.shape == (2, 6, 16) and len(hiddens2) == 4


def test_weight_tying_shares_every_layer():
    tied, untied = make(weight_tie_layers=True, depth=3), make(depth=3)
    assert tied.block_order == (0, 0, 0) and len(tied.blocks) == 1
    assert untied.block_order == (0, 1, 2) and len(untied.blocks) == 3
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 2 * sum(p.numel() for p in tied.blocks[0].parameters())


def test_decoder_has_no_query_residual_and_optional_ff():
    assert make().decoder_cross_attn.mlp is None
    assert make(decoder_ff=True).decoder_cross_attn.mlp is not None
    assert not make().decoder_cross_attn.query_residual


def test_mask_reaches_only_the_encoder():
    model = make()
    data, q = torch.randn(2, 9, 10), torch.randn(4, 12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    torch.testing.assert_close(model(data, mask=mask, queries=q), model(data, queries=q))
    mask[:, 4:] = False
    torch.testing.assert_close(
        model(data, mask=mask, queries=q), model(data[:, :4], queries=q), atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("prob", [0.25, 0.5, 0.9])
def test_dropout_seq_keeps_valid_tokens_first(prob):
    gen = torch.Generator().manual_seed(3)
    data = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1)
    mask = torch.rand(2, 8, generator=gen) > 0.5
    mask[:, 0] = True
    torch.manual_seed(0)
    kept, kept_mask = dropout_seq(data, mask, prob)
    k = max(1, int((1 - prob) * 8))
    assert kept.shape == (2, k, 1) and kept_mask.shape == (2, k)
    for b in range(2):
        valid = mask[b].sum().item()
        idx = kept[b, :, 0].long() - 8 * b
        # as many valid tokens as fit are kept, and the kept mask marks ceil(valid · (1 - p)) of them
        assert mask[b, idx].sum().item() == min(valid, k)
        assert kept_mask[b].sum().item() == min(
            int(torch.ceil(torch.tensor(valid * (1 - prob)))), mask[b, idx].sum()
        )
        assert torch.all(mask[b, idx][kept_mask[b]])
    kept, none = dropout_seq(data, None, prob)
    assert kept.shape == (2, k, 1) and none is None


def test_seq_dropout_only_in_training():
    model = make(seq_dropout_prob=0.5)
    data, q = torch.randn(2, 8, 10), torch.randn(4, 12)
    lengths = []
    hook = model.encoder_cross_attn.norm_kv.register_forward_hook(lambda m, a, o: lengths.append(o.shape[1]))
    model(data, queries=q)
    model.train()
    model(data, queries=q)
    hook.remove()
    assert lengths == [8, 4]
    model.eval()
    plain = make()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(data, queries=q), plain(data, queries=q))


def test_every_parameter_gets_a_gradient():
    model = make(decoder_ff=True, attn_residual=True, attn_residual_rank=4)
    model(torch.randn(2, 9, 10), mask=torch.rand(2, 9) > 0.3, queries=torch.randn(4, 12)).sum().backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing


# ---- PerceiverLM ------------------------------------------------------------------------------------------


def test_lm_shapes_and_id_dtypes():
    lm = PerceiverLM(**LM_KW).eval()
    assert lm(torch.randint(0, 11, (2, 10))).shape == (2, 10, 11)  # max_seq_len exactly
    assert lm(torch.randint(0, 11, (2, 3), dtype=torch.int32)).shape == (2, 3, 11)
    assert lm(torch.randint(0, 11, (1, 1))).shape == (1, 1, 11)


def test_lm_is_not_causal():
    """The inputs are the decoder queries and every query sees all latents: later tokens change earlier
    outputs."""
    lm = PerceiverLM(**LM_KW).eval()
    ids = torch.randint(0, 11, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 11
    with torch.no_grad():
        assert not torch.allclose(lm(ids)[0, 0], lm(changed)[0, 0])


def test_lm_gradients_reach_embeddings():
    lm = PerceiverLM(**LM_KW)
    ids = torch.randint(0, 11, (2, 6))
    torch.nn.functional.cross_entropy(lm(ids).flatten(0, 1), ids.flatten()).backward()
    assert lm.token_emb.weight.grad[ids.unique()].abs().sum() > 0
    assert lm.pos_emb.weight.grad[:6].abs().sum() > 0
    assert torch.all(lm.pos_emb.weight.grad[6:] == 0)
