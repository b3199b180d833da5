"""DeepMind-layout Perceiver IO models assembled from ``perceivers.layers``, loaded from transformers.

Used by the benchmark to run *the same* model as a transformers Perceiver (same weights, outputs
checked equal) on perceivers' layers, for the workloads where ``perceivers.create_model`` is not
available yet. Shapes are read from the transformers modules, so any config maps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perceivers.layers import CrossAttentionBlock, FourierPositionEncoding, SelfAttentionBlock

__all__ = ["DMImageFourier", "DMMaskedLM", "DMPerceiverIO"]


def _attention_shapes(layer) -> dict:
    sa = layer.attention.self
    return {
        "num_heads": sa.num_heads, "qk_channels": sa.query.out_features, "v_channels": sa.value.out_features,
        "qkv_bias": True,
    }


def _mlp_mult(layer) -> int:
    return layer.mlp.dense1.out_features // layer.mlp.dense1.in_features


def _act(config) -> str:
    act = config.hidden_act
    if act in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        return "gelu" if act == "gelu" else "gelu_tanh"
    raise ValueError(f"unsupported activation {act!r}")


def _copy_attention(ours, layer) -> None:
    sa, out = layer.attention.self, layer.attention.output
    with torch.no_grad():
        for mine, theirs in ((ours.to_q, sa.query), (ours.to_k, sa.key), (ours.to_v, sa.value),
                             (ours.to_out, out.dense)):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)


def _copy_norm(ours: nn.LayerNorm, theirs: nn.LayerNorm) -> None:
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)


def _copy_mlp(ours, layer) -> None:
    with torch.no_grad():
        ours.fc1.weight.copy_(layer.mlp.dense1.weight)
        ours.fc1.bias.copy_(layer.mlp.dense1.bias)
        ours.fc2.weight.copy_(layer.mlp.dense2.weight)
        ours.fc2.bias.copy_(layer.mlp.dense2.bias)


def cross_block_from_hf(layer, config) -> CrossAttentionBlock:
    sa = layer.attention.self
    block = CrossAttentionBlock(
        sa.layernorm1.normalized_shape[0], sa.layernorm2.normalized_shape[0], **_attention_shapes(layer),
        out_dim=layer.attention.output.dense.out_features, query_residual=layer.attention.use_query_residual,
        mlp_mult=_mlp_mult(layer), activation=_act(config),
    )
    _copy_norm(block.norm_q, sa.layernorm1)
    _copy_norm(block.norm_kv, sa.layernorm2)
    _copy_attention(block.attn, layer)
    _copy_norm(block.norm_mlp, layer.layernorm)
    _copy_mlp(block.mlp, layer)
    return block


def self_block_from_hf(layer, config) -> SelfAttentionBlock:
    sa = layer.attention.self
    block = SelfAttentionBlock(sa.layernorm1.normalized_shape[0], **_attention_shapes(layer),
                               mlp_mult=_mlp_mult(layer), activation=_act(config))
    _copy_norm(block.norm, sa.layernorm1)
    _copy_attention(block.attn, layer)
    _copy_norm(block.norm_mlp, layer.layernorm)
    _copy_mlp(block.mlp, layer)
    return block


class _Trunk(nn.Module):
    """Latents → one cross-attention → ``num_blocks`` × shared self-attention stack."""

    def __init__(self, perceiver) -> None:
        super().__init__()
        config = perceiver.config
        self.latents = nn.Parameter(perceiver.embeddings.latents.detach().clone())
        enc = perceiver.encoder
        self.cross = cross_block_from_hf(enc.cross_attention, config)
        self.selfs = nn.ModuleList(self_block_from_hf(layer, config) for layer in enc.self_attends)
        self.num_blocks = config.num_blocks

    def forward(self, context: Tensor) -> Tensor:
        x = self.latents.to(context.dtype).expand(context.shape[0], -1, -1)
        x = self.cross(x, context)
        for _ in range(self.num_blocks):
            for layer in self.selfs:
                x = layer(x)
        return x


class DMPerceiverIO(nn.Module):
    """``PerceiverModel`` without preprocessor + ``PerceiverBasicDecoder`` with trainable queries.

    ``forward(inputs [B, M, d_model])`` → ``[B, num_queries, output_num_channels]``.
    """

    def __init__(self, hf) -> None:
        super().__init__()
        self.trunk = _Trunk(hf)
        dec = hf.decoder
        self.queries = nn.Parameter(dec.output_position_encodings.position_embeddings.detach().clone())
        self.decoder = cross_block_from_hf(dec.decoding_cross_attention, hf.config)
        self.final = nn.Linear(dec.final_layer.in_features, dec.final_layer.out_features)
        self.final.load_state_dict(dec.final_layer.state_dict())

    def forward(self, inputs: Tensor) -> Tensor:
        z = self.trunk(inputs)
        q = self.queries.to(z.dtype).expand(z.shape[0], -1, -1)
        return self.final(self.decoder(q, z))


class DMImageFourier(nn.Module):
    """``PerceiverForImageClassificationFourier``: pixels + 2-D Fourier features → logits.

    ``forward(pixel_values [B, 3, H, W])`` → ``[B, num_labels]``.
    """

    def __init__(self, hf) -> None:
        super().__init__()
        pre = hf.perceiver.input_preprocessor
        pe = pre.position_embeddings
        self.position_encoding = FourierPositionEncoding(
            2, pe.num_bands, tuple(pe.max_resolution), layout="deepmind", concat_pos=pe.concat_pos,
            sine_only=pe.sine_only,
        )
        self.trunk = _Trunk(hf.perceiver)
        dec = hf.perceiver.decoder.decoder
        self.query = nn.Parameter(dec.output_position_encodings.position_embeddings.detach().clone())
        self.decoder = cross_block_from_hf(dec.decoding_cross_attention, hf.config)
        self.final = nn.Linear(dec.final_layer.in_features, dec.final_layer.out_features)
        self.final.load_state_dict(dec.final_layer.state_dict())

    def forward(self, pixel_values: Tensor) -> Tensor:
        b, c, h, w = pixel_values.shape
        x = pixel_values.permute(0, 2, 3, 1).reshape(b, h * w, c)
        feats = self.position_encoding((h, w), device=x.device, dtype=x.dtype)
        context = torch.cat((x, feats.expand(b, -1, -1)), dim=-1)
        z = self.trunk(context)
        q = self.query.to(z.dtype).expand(b, -1, -1)
        return self.final(self.decoder(q, z))[:, 0]


class DMMaskedLM(nn.Module):
    """``PerceiverForMaskedLM``: bytes + learned positions → trunk → 2048 queries → tied embedding logits."""

    def __init__(self, hf) -> None:
        super().__init__()
        pre = hf.perceiver.input_preprocessor
        self.embed = nn.Embedding.from_pretrained(pre.embeddings.weight.detach().clone(), freeze=False)
        self.positions = nn.Embedding.from_pretrained(pre.position_embeddings.weight.detach().clone(), freeze=False)
        self.trunk = _Trunk(hf.perceiver)
        dec = hf.perceiver.decoder
        self.queries = nn.Parameter(dec.output_position_encodings.position_embeddings.detach().clone())
        self.decoder = cross_block_from_hf(dec.decoding_cross_attention, hf.config)
        self.bias = nn.Parameter(hf.embedding_decoder.bias.detach().clone())

    def forward(self, input_ids: Tensor) -> Tensor:
        n = input_ids.shape[1]
        x = self.embed(input_ids) + self.positions(torch.arange(n, device=input_ids.device))
        z = self.trunk(x)
        q = self.queries.to(z.dtype).expand(z.shape[0], -1, -1)
        out = self.decoder(q, z)
        return out @ self.embed.weight.T.to(out.dtype) + self.bias
