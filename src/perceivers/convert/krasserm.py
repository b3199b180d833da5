"""krasserm's perceiver-io Perceiver AR state dicts → perceivers :class:`~perceivers.models.perceiver_ar.PerceiverAR`.

Two layouts of ``perceiver.model.text.clm.CausalLanguageModel`` are read (told apart by the position
table's name):

- 0.6.0: ``input_adapter.pos_encoding`` (a parameter) and an ``output_layer`` Linear;
- 0.11.0: ``input_adapter.pos_embedding.weight`` (an ``nn.Embedding``) and an output tied to the token
  embedding (copied into our ``output_layer``). Its rotary embedding pairs adjacent channels
  ``(2i, 2i + 1)`` where ours (and 0.6.0's) pairs ``i`` with ``i + r/2``: the query/key projection rows
  of each head are permuted to match, which leaves every attention score unchanged. Models built with
  ``output_bias=True``, ``output_norm=True`` or ``abs_pos_emb=False`` are refused.

The key tables rename every tensor; a tensor that no rule names is refused. krasserm stores the rotary
frequencies (``frq_pos_encoding.inv_freq``); ours are a constant of the module, so they are checked
against the model's and then dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .state_dict import CheckpointError, Rule, load_state_dict_strict, rename_by_rules, strip_wrapper_prefixes

__all__ = ["check_hyperparameters", "from_krasserm_perceiver_ar", "load_krasserm_perceiver_ar"]

_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out"}
_MLP = {"0": "norm_mlp", "1": "mlp.fc1", "3": "mlp.fc2"}  # LayerNorm, Linear, GELU, Linear


def _layer(theirs: str, ours: str, norms: dict[str, str]) -> list[Rule]:
    """An attention layer (``<theirs>.0.module``) and its MLP (``<theirs>.1.module``) → ``<ours>.…``."""
    return [
        *[(f"{theirs}.0.module.{n}.{{p}}", f"{ours}.{o}.{{p}}") for n, o in norms.items()],
        *[(f"{theirs}.0.module.attention.{k}_proj.{{p}}", f"{ours}.attn.{o}.{{p}}") for k, o in _PROJ.items()],
        *[(f"{theirs}.1.module.{i}.{{p}}", f"{ours}.{o}.{{p}}") for i, o in _MLP.items()],
    ]


#: krasserm's names → ours (``{i}`` a self-attention layer, ``{p}`` weight or bias)
_RULES: list[Rule] = [
    ("input_adapter.txt_embedding.weight", "input_adapter.token_embedding.weight"),
    ("input_adapter.pos_encoding", "input_adapter.pos_embedding"),
    ("output_layer.{p}", "output_layer.{p}"),
    *_layer("cross_attention", "cross_attention", {"q_norm": "norm_q", "kv_norm": "norm_kv"}),
    *_layer("self_attention.{i}", "self_attention.{i}", {"norm": "norm"}),
]
#: 0.11.0: positions in an ``nn.Embedding``, the output tied to the token embedding
_RULES_011: list[Rule] = [
    ("input_adapter.txt_embedding.weight", "input_adapter.token_embedding.weight"),
    ("input_adapter.pos_embedding.weight", "input_adapter.pos_embedding"),
    *_layer("cross_attention", "cross_attention", {"q_norm": "norm_q", "kv_norm": "norm_kv"}),
    *_layer("self_attention.{i}", "self_attention.{i}", {"norm": "norm"}),
]
_INV_FREQ = "input_adapter.frq_pos_encoding.inv_freq"
_UNSUPPORTED_011 = {"output_adapter.bias": "output_bias=True", "out_norm.weight": "output_norm=True"}


def _interleaved_to_halves(weight: Tensor, num_heads: int, rotated: int) -> Tensor:
    """Query/key projection ``[H·d, C]``: per head, rows ``0, 2, …, r-2, 1, 3, …, r-1, r, …, d-1``."""
    d = weight.shape[0] // num_heads
    order = torch.cat((torch.arange(0, rotated, 2), torch.arange(1, rotated, 2), torch.arange(rotated, d)))
    return weight.view(num_heads, d, -1)[:, order].reshape(weight.shape)


def _from_011(state: Mapping[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    for key, option in _UNSUPPORTED_011.items():
        if key in state:
            raise CheckpointError(f"krasserm Perceiver AR state dict has {key}: models built with {option} "
                                  "are not supported")
    rotated = 2 * state[_INV_FREQ].numel()

    def permute(old: str, new: str, value: Tensor) -> Tensor:
        if old.endswith(("q_proj.weight", "k_proj.weight")):
            return _interleaved_to_halves(value, num_heads, rotated)
        return value

    out = rename_by_rules({k: v for k, v in state.items() if k != _INV_FREQ}, _RULES_011,
                          what="Perceiver AR (0.11.0)", source="krasserm", transform=permute)
    out["output_layer.weight"] = out["input_adapter.token_embedding.weight"].clone()  # tied in theirs
    return out


def check_hyperparameters(hparams: Mapping[str, object], model: nn.Module, *, source: str = "checkpoint") -> None:
    """Refuse a krasserm Lightning checkpoint's ``hyper_parameters`` that ``model`` (a :class:`PerceiverAR`)
    does not have: the settings its state dict cannot show (the latent count, the rotary layers, the heads),
    which would otherwise load silently into a model that computes something else."""
    layers = len(model.self_attention)
    rotary = hparams.get("num_self_attention_rotary_layers", 1)
    latents = "num_latents" if "max_latents" not in hparams else "max_latents"  # 0.6.0's name, 0.11.0's
    ours = {latents: model.num_latents, "num_heads": model.cross_attention.attn.num_heads,
            "num_self_attention_rotary_layers": min(model.num_self_attention_rotary_layers, layers)}
    theirs = {latents: hparams.get(latents), "num_heads": hparams.get("num_heads"),
              "num_self_attention_rotary_layers": layers if rotary == -1 else min(rotary, layers)}
    wrong = [f"{k}={theirs[k]} (the model has {v})" for k, v in ours.items() if theirs[k] is not None and theirs[k] != v]
    if wrong:
        raise CheckpointError(f"{source} was trained with {', '.join(wrong)}: build the model with the same "
                              "settings (CausalLanguageModelConfig's num_latents, num_heads, num_self_attention_rotary_layers)")


def _unwrap(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The model's own state dict inside a Lightning checkpoint (``{"state_dict": {"model.…": …}}``, krasserm's
    ``LitCausalLanguageModel`` holds the model as ``model``) and the prefixes of DDP / ``torch.compile``."""
    inner = state.get("state_dict")
    if isinstance(inner, Mapping):
        state = inner
    state = strip_wrapper_prefixes(state)
    if _INV_FREQ not in state and state and all(k.startswith("model.") for k in state):
        state = strip_wrapper_prefixes({k.removeprefix("model."): v for k, v in state.items()})
    return state


def from_krasserm_perceiver_ar(state: Mapping[str, Tensor], model: nn.Module | None = None, *,
                               num_heads: int | None = None) -> dict[str, Tensor]:
    """Rename krasserm's ``PerceiverAR``/``CausalLanguageModel`` tensors (0.6.0 or 0.11.0) to ours (strict).

    ``state`` is the model's ``state_dict()``, or a Lightning checkpoint of it (``{"state_dict": {"model.…"}}``),
    DDP / ``torch.compile`` prefixes allowed. The 0.11.0 layout needs the head count (``num_heads``, or read from
    ``model``) to permute the rotary channels. Raises :class:`CheckpointError` naming the tensors no rule covers,
    and (with ``model``) when the stored rotary frequencies differ from the model's.
    """
    hparams = state.get("hyper_parameters")
    if model is not None and isinstance(hparams, Mapping):  # a Lightning checkpoint records the model's settings
        check_hyperparameters(hparams, model)
    state = _unwrap(state)
    if _INV_FREQ not in state:
        raise CheckpointError(f"not a krasserm Perceiver AR state dict: it has no {_INV_FREQ} "
                              f"(first keys: {', '.join(list(state)[:4])})")
    if "input_adapter.pos_encoding" in state:  # 0.6.0
        out = rename_by_rules({k: v for k, v in state.items() if k != _INV_FREQ}, _RULES, what="Perceiver AR",
                              source="krasserm")
    else:
        if num_heads is None and model is not None:
            num_heads = model.cross_attention.attn.num_heads
        if num_heads is None:
            raise ValueError("krasserm 0.11.0 Perceiver AR state dicts need num_heads (or model) to convert")
        out = _from_011(state, num_heads)
    if model is not None:
        ours = model.rotary.inv_freq
        theirs = state[_INV_FREQ]
        if theirs.shape != ours.shape:
            raise CheckpointError(f"krasserm Perceiver AR state dict does not fit: {_INV_FREQ} "
                                  f"{tuple(theirs.shape)} differs from the model's rotary frequencies {tuple(ours.shape)}")
        # compared at the stored precision: a bfloat16 / float16 checkpoint holds them rounded
        rtol = max(1e-6, torch.finfo(theirs.dtype).eps) if theirs.is_floating_point() else 1e-6
        if not torch.allclose(theirs.double(), ours.double(), rtol=rtol, atol=0):
            raise CheckpointError(f"krasserm Perceiver AR state dict does not fit: the values of {_INV_FREQ} differ "
                                  f"from the model's rotary frequencies ({theirs.tolist()} vs {ours.tolist()}; "
                                  "another num_channels // num_heads?)")
    return out


def load_krasserm_perceiver_ar(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Convert ``state`` (krasserm's keys) and load it strictly into ``model`` (every tensor used, shapes equal)."""
    return load_state_dict_strict(model, from_krasserm_perceiver_ar(state, model), source="krasserm Perceiver AR state dict")
