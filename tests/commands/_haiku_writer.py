"""Test-only writer of DeepMind's Haiku checkpoint layout, from one of our task models' weights.

The module paths are spelled out from the official code's naming (official.md §3.2) independently of
perceivers.convert.haiku's key tables, so a round trip checks those tables too. Layout:

- ImageNet models: ``{"params": {module: {param: array}}, "state": {module: {name: array}}}`` with the
  BatchNorm EMAs (``average``, ``hidden``, ``counter``) in ``state``;
- MLM / optical flow: the params mapping itself.

Linear weights are stored ``[in, out]``, conv kernels HWIO, BatchNorm parameters ``[1, 1, 1, C]``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from torch import nn


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _hk(name: str, k: int) -> str:
    return name if k == 0 else f"{name}_{k}"


def _linear(params, module: str, sd, ours: str) -> None:
    params[module] = {"w": _np(sd[f"{ours}.weight"]).T, "b": _np(sd[f"{ours}.bias"])}


def _norm(params, module: str, sd, ours: str) -> None:
    params[module] = {"scale": _np(sd[f"{ours}.weight"]), "offset": _np(sd[f"{ours}.bias"])}


def _attention_block(params, hk: str, sd, ours: str, *, cross: bool) -> None:
    norms = ("norm_q", "norm_kv", "norm_mlp") if cross else ("norm", "norm_mlp")
    for k, n in enumerate(norms):
        _norm(params, f"{hk}/{_hk('layer_norm', k)}", sd, f"{ours}.{n}")
    for k, n in enumerate(("to_q", "to_k", "to_v", "to_out")):
        _linear(params, f"{hk}/attention/{_hk('linear', k)}", sd, f"{ours}.attn.{n}")
    _linear(params, f"{hk}/mlp/linear", sd, f"{ours}.mlp.fc1")
    _linear(params, f"{hk}/mlp/linear_1", sd, f"{ours}.mlp.fc2")


def _encoder(params, sd, num_self_attends: int) -> None:
    hk = "perceiver_encoder"
    params[f"{hk}/~/trainable_position_encoding"] = {"pos_embs": _np(sd["perceiver.encoder.latents.embeddings"])}
    _attention_block(params, f"{hk}/~/cross_attention", sd, "perceiver.encoder.cross_attention", cross=True)
    for k in range(num_self_attends):
        _attention_block(params, f"{hk}/~/{_hk('self_attention', k)}", sd, f"perceiver.encoder.self_attends.{k}",
                         cross=False)


def haiku_tree(model: nn.Module) -> dict:
    """Our registry model → the nested object the official pickle holds."""
    sd = model.state_dict()
    name = model.model_name
    params: dict[str, dict[str, np.ndarray]] = {}
    state: dict[str, dict[str, np.ndarray]] = {}
    _encoder(params, sd, model.config.num_self_attends_per_block)
    if name.startswith("vision-perceiver"):
        dec = "classification_decoder/~/basic_decoder"
        params[f"{dec}/~/trainable_position_encoding"] = {
            "pos_embs": _np(sd["perceiver.decoder.decoder.queries.table.embeddings"])}
        _attention_block(params, f"{dec}/cross_attention", sd, "perceiver.decoder.decoder.cross_attention", cross=True)
        _linear(params, f"{dec}/output", sd, "perceiver.decoder.decoder.output")
        pre = "perceiver.input_preprocessor"
        if name.endswith("conv"):
            stem = "image_preprocessor/~/conv2_d_downsample/~"
            params[f"{stem}/conv"] = {"w": _np(sd[f"{pre}.stem.layers.0.conv.weight"]).transpose(2, 3, 1, 0)}
            bn = f"{pre}.stem.layers.0.norm"
            params[f"{stem}/batchnorm"] = {"scale": _np(sd[f"{bn}.weight"]).reshape(1, 1, 1, -1),
                                           "offset": _np(sd[f"{bn}.bias"]).reshape(1, 1, 1, -1)}
            for ema, buf in (("mean_ema", "running_mean"), ("var_ema", "running_var")):
                avg = _np(sd[f"{bn}.{buf}"]).reshape(1, 1, 1, -1)
                state[f"{stem}/batchnorm/~/{ema}"] = {"average": avg, "hidden": avg * 0.5,
                                                      "counter": np.array(7, dtype=np.int32)}
        elif name.endswith("learned"):
            params["image_preprocessor/~/conv2_d"] = {"w": _np(sd[f"{pre}.stem.weight"]).transpose(2, 3, 1, 0),
                                                      "b": _np(sd[f"{pre}.stem.bias"])}
            net = "image_preprocessor/~_build_network_inputs"
            params[f"{net}/trainable_position_encoding"] = {
                "pos_embs": _np(sd[f"{pre}.position_encoding.base.table.embeddings"])}
            _linear(params, f"{net}/position_encoding_projector/linear", sd, f"{pre}.position_encoding.proj")
        return {"params": params, "state": state}
    if name == "optical-flow-perceiver":
        _linear(params, "image_preprocessor/patches_linear", sd, "perceiver.input_preprocessor.patches_linear")
        dec = "flow_decoder/~/basic_decoder"
        _attention_block(params, f"{dec}/cross_attention", sd, "perceiver.decoder.decoder.cross_attention", cross=True)
        _linear(params, f"{dec}/output", sd, "perceiver.decoder.decoder.output")
        return params
    if name == "language-perceiver":
        params["embed"] = {"embeddings": _np(sd["perceiver.input_preprocessor.embeddings.weight"])}
        params["trainable_position_encoding"] = {
            "pos_embs": _np(sd["perceiver.input_preprocessor.position_embeddings.embeddings"])}
        params["basic_decoder/~/trainable_position_encoding"] = {
            "pos_embs": _np(sd["perceiver.decoder.queries.table.embeddings"])}
        _attention_block(params, "basic_decoder/cross_attention", sd, "perceiver.decoder.cross_attention", cross=True)
        params["embedding_decoder"] = {"bias": _np(sd["embedding_decoder.bias"])}
        return params
    raise ValueError(f"no Haiku writer for {name}")


def write_haiku_pickle(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    with open(path, "wb") as f:
        pickle.dump(haiku_tree(model), f, protocol=4)
    return path
