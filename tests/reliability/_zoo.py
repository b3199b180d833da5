"""A catalogue of tiny models from every corner of the library, with input builders, for the fuzzers.

A :class:`Case` is one built model plus how to make its inputs and read its output:

* ``make(draw, batch, gen)`` → a dict of inputs (``draw`` is hypothesis' ``data.draw``, so shapes are
  drawn too); keys in ``case.shared`` are not batched (e.g. 2-D decoder queries);
* ``run(model, inputs)`` → one floating tensor ``[B, ...]`` (the documented output);
* ``data_key`` / ``mask_key`` name the input a boolean mask ``[B, *axes]`` (True = attend) applies to;
* ``set_input``: the output does not depend on the order of the ``data_key`` tokens (no positions).

Configurations are drawn by the strategies in :data:`CONFIGS`; the registered task models use their
``tiny`` sizes.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

import perceivers
from perceivers import (
    BottomUpPerceiver,
    GatedPerceiver,
    InputModality,
    MixedLatentsPerceiver,
    MultiModalityPerceiver,
    Perceiver,
    PerceiverIO,
    PerceiverLM,
)
from perceivers.io import BasicDecoder, PerceiverEncoder, PerceiverIOModel, TrainableQueries


@dataclass
class Case:
    name: str
    model: nn.Module
    make: Callable[[Callable, int, torch.Generator], dict[str, Tensor]]
    run: Callable[[nn.Module, dict[str, Any]], Tensor]
    data_key: str = "data"
    mask_key: str | None = None
    set_input: bool = False
    float_data: bool = True
    shared: frozenset[str] = field(default_factory=frozenset)
    # masked positions of data_key also decode there (LM): compare outputs only where the mask is True
    outputs_follow_mask: bool = False
    config: dict = field(default_factory=dict)


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """No parameter at its neutral init (norm weights 1, biases 0, zero-init outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _int(draw, lo: int, hi: int) -> int:
    """``draw(integers(lo, hi))``, or ``min(hi, lo + 3)`` without hypothesis (``draw=None``)."""
    return min(hi, lo + 3) if draw is None else draw(st.integers(lo, hi))


def _choice(draw, options: list):
    return options[0] if draw is None else draw(st.sampled_from(options))


def _mask(draw, shape: tuple[int, ...], allow_empty_rows: bool = True) -> Tensor:
    """A boolean mask of ``shape`` (``[B, *axes]``); rows may be fully masked when allowed.

    Without hypothesis (``draw=None``): alternating True/False.
    """
    b, n = shape[0], math.prod(shape[1:])
    if draw is None:
        return (torch.arange(b * n) % 2 == 0).reshape(shape)
    rows = []
    for _ in range(b):
        kind = draw(st.sampled_from(["random", "all", "none"] if allow_empty_rows else ["random", "all"]))
        if kind == "all":
            rows.append([True] * n)
        elif kind == "none":
            rows.append([False] * n)
        else:
            row = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            if not allow_empty_rows and not any(row):
                row[0] = True
            rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(shape)


def _quiet(build: Callable[[], nn.Module]) -> nn.Module:
    with warnings.catch_warnings():  # narrow contexts are drawn on purpose
        warnings.simplefilter("ignore")
        return build()


# ------------------------------------------------------------------------------------------------ perceiver family

_SMALL = {"num_latents": st.integers(1, 6), "latent_dim": st.sampled_from([8, 16]), "cross_heads": st.integers(1, 2),
              "latent_heads": st.integers(1, 2), "cross_dim_head": st.sampled_from([4, 8]),
              "latent_dim_head": st.sampled_from([4, 8]), "num_classes": st.integers(1, 4)}

PERCEIVER = st.fixed_dictionaries({
    **_SMALL, "depth": st.integers(1, 3), "weight_tie_layers": st.booleans(), "self_per_cross_attn": st.integers(1, 2),
    "input_axis": st.integers(1, 2), "input_channels": st.integers(1, 4), "fourier_encode_data": st.booleans(),
    "num_freq_bands": st.integers(1, 3), "max_freq": st.sampled_from([4.0, 10.0]),
    "inverted_cross_attn": st.booleans(), "attn_residual": st.booleans(),
})


def _grid_input(model_cfg: dict) -> Callable:
    axis, channels = model_cfg["input_axis"], model_cfg["input_channels"]

    def make(draw, batch, gen):
        shape = (batch, *(_int(draw, 1, 4) for _ in range(axis)))
        return {"data": torch.randn(*shape, channels, generator=gen), "mask": _mask(draw, shape)}

    return make


def perceiver(cfg: dict, seed: int = 0) -> Case:
    kw = dict(cfg)
    kw["attn_residual_rank"] = 4
    model = _perturb(_quiet(lambda: Perceiver(**kw)), seed)
    return Case("Perceiver", model, _grid_input(cfg), lambda m, i: m(i["data"], mask=i["mask"]), mask_key="mask",
                set_input=not cfg["fourier_encode_data"], config=cfg)


VARIANT = st.fixed_dictionaries({
    **_SMALL, "depth": st.integers(1, 3), "weight_tie_layers": st.booleans(), "input_axis": st.integers(1, 2),
    "input_channels": st.integers(1, 4), "fourier_encode_data": st.booleans(), "num_freq_bands": st.integers(1, 3),
    "max_freq": st.sampled_from([4.0, 10.0]), "kind": st.sampled_from(["gated", "mixed", "bottom_up"]),
})


def variant(cfg: dict, seed: int = 0) -> Case:
    kw = {k: v for k, v in cfg.items() if k != "kind"}
    cls = {"gated": GatedPerceiver, "mixed": MixedLatentsPerceiver, "bottom_up": BottomUpPerceiver}[cfg["kind"]]
    if cfg["kind"] == "bottom_up":
        kw.update(input_heads=2, input_dim_head=4)
    model = _perturb(_quiet(lambda: cls(**kw)), seed)
    return Case(cls.__name__, model, _grid_input(cfg), lambda m, i: m(i["data"], mask=i["mask"]), mask_key="mask",
                set_input=not cfg["fourier_encode_data"], config=cfg)


IO = st.fixed_dictionaries({
    **{k: v for k, v in _SMALL.items() if k != "num_classes"}, "depth": st.integers(1, 2),
    "weight_tie_layers": st.booleans(), "dim": st.integers(1, 6), "queries_dim": st.integers(2, 8),
    "logits_dim": st.one_of(st.none(), st.integers(1, 3)), "decoder_ff": st.booleans(),
    "inverted_cross_attn": st.booleans(), "attn_residual": st.booleans(), "batched_queries": st.booleans(),
})


def perceiver_io(cfg: dict, seed: int = 0) -> Case:
    kw = {k: v for k, v in cfg.items() if k != "batched_queries"}
    kw["attn_residual_rank"] = 4
    model = _perturb(_quiet(lambda: PerceiverIO(**kw)), seed)

    def make(draw, batch, gen):
        n, m = _int(draw, 1, 6), _int(draw, 1, 4)
        q_shape = (batch, m, cfg["queries_dim"]) if cfg["batched_queries"] else (m, cfg["queries_dim"])
        return {"data": torch.randn(batch, n, cfg["dim"], generator=gen), "mask": _mask(draw, (batch, n)),
                "queries": torch.randn(*q_shape, generator=gen)}

    shared = frozenset() if cfg["batched_queries"] else frozenset({"queries"})
    return Case("PerceiverIO", model, make, lambda m, i: m(i["data"], mask=i["mask"], queries=i["queries"]),
                mask_key="mask", set_input=True, shared=shared, config=cfg)


LM = st.fixed_dictionaries({
    **{k: v for k, v in _SMALL.items() if k != "num_classes"}, "depth": st.integers(1, 2),
    "dim": st.sampled_from([4, 8]), "num_tokens": st.integers(2, 20), "max_seq_len": st.integers(1, 8),
})


def perceiver_lm(cfg: dict, seed: int = 0) -> Case:
    model = _perturb(PerceiverLM(**cfg), seed)

    def make(draw, batch, gen):
        n = _int(draw, 1, cfg["max_seq_len"])
        return {"data": torch.randint(0, cfg["num_tokens"], (batch, n), generator=gen),
                "mask": _mask(draw, (batch, n))}

    return Case("PerceiverLM", model, make, lambda m, i: m(i["data"], mask=i["mask"]), mask_key="mask",
                float_data=False, outputs_follow_mask=True, config=cfg)


MULTIMODAL = st.fixed_dictionaries({
    **{k: v for k, v in _SMALL.items() if k != "num_classes"}, "depth": st.integers(1, 2),
    "weight_tie_layers": st.booleans(), "num_latent_blocks_per_layer": st.integers(1, 2), "use_gelu": st.booleans(),
    "num_classes": st.one_of(st.none(), st.integers(1, 3)), "a_channels": st.integers(1, 3),
    "b_channels": st.integers(1, 3),
})


def multimodality(cfg: dict, seed: int = 0) -> Case:
    kw = {k: v for k, v in cfg.items() if k not in ("a_channels", "b_channels")}
    mods = [InputModality("a", cfg["a_channels"], 1, 2, 6.0), InputModality("b", cfg["b_channels"], 2, 2, 6.0)]
    model = _perturb(_quiet(lambda: MultiModalityPerceiver(modalities=mods, **kw)), seed)

    def make(draw, batch, gen):
        n, h, w = _int(draw, 1, 5), _int(draw, 1, 3), _int(draw, 1, 3)
        return {"data": torch.randn(batch, n, cfg["a_channels"], generator=gen), "mask": _mask(draw, (batch, n)),
                "b": torch.randn(batch, h, w, cfg["b_channels"], generator=gen)}

    return Case("MultiModalityPerceiver", model, make,
                lambda m, i: m({"a": i["data"], "b": i["b"]}, masks={"a": i["mask"]}), mask_key="mask", config=cfg)


ENCODER = st.fixed_dictionaries({
    "input_channels": st.integers(1, 6), "num_latents": st.integers(1, 5), "latent_channels": st.sampled_from([8, 16]),
    "num_blocks": st.integers(1, 2), "num_self_attends_per_block": st.integers(1, 2),
    "num_cross_attention_heads": st.sampled_from([1, 2]), "num_self_attention_heads": st.sampled_from([1, 2]),
    "cross_attention_shape_for_attn": st.sampled_from(["kv", "q"]), "use_query_residual": st.booleans(),
    "num_queries": st.integers(1, 4), "query_channels": st.sampled_from([4, 8]),
    "output_channels": st.one_of(st.none(), st.integers(1, 3)),
})


def io_model(cfg: dict, seed: int = 0) -> Case:
    """DeepMind's decomposition without a preprocessor: inputs ``[B, M, C]`` with an input mask."""
    c = cfg
    heads = c["num_cross_attention_heads"]
    qk = None if c["cross_attention_shape_for_attn"] == "q" or c["input_channels"] % heads == 0 else c["latent_channels"]

    def build():
        enc = PerceiverEncoder(
            c["input_channels"], num_latents=c["num_latents"], latent_channels=c["latent_channels"],
            num_blocks=c["num_blocks"], num_self_attends_per_block=c["num_self_attends_per_block"],
            num_cross_attention_heads=heads, num_self_attention_heads=c["num_self_attention_heads"],
            cross_attention_shape_for_attn=c["cross_attention_shape_for_attn"], use_query_residual=c["use_query_residual"],
            qk_channels=qk,
        )
        dec = BasicDecoder(TrainableQueries(c["num_queries"], c["query_channels"]), latent_channels=c["latent_channels"],
                           output_channels=c["output_channels"])
        return PerceiverIOModel(enc, dec)

    model = _perturb(_quiet(build), seed)

    def make(draw, batch, gen):
        n = _int(draw, 1, 6)
        return {"data": torch.randn(batch, n, c["input_channels"], generator=gen), "mask": _mask(draw, (batch, n))}

    return Case("PerceiverIOModel", model, make, lambda m, i: m(i["data"], input_mask=i["mask"]).logits,
                mask_key="mask", set_input=True, config=cfg)


# ------------------------------------------------------------------------------------------------ registry models


def _registry_make(name: str, model: nn.Module) -> tuple[Callable, Callable, str | None, bool]:
    """(make, run, mask_key, float_data) for a registered task model."""
    c = model.config
    if name.startswith("vision"):
        size = c.image_size

        def make(draw, batch, gen):
            return {"data": torch.randn(batch, c.in_channels, *size, generator=gen)}

        return make, lambda m, i: m(i["data"]).logits, None, True
    if name.startswith("language"):
        def make(draw, batch, gen):
            n = _int(draw, 1, c.max_position_embeddings)
            ids = torch.randint(0, c.vocab_size, (batch, n), generator=gen)
            return {"data": ids, "mask": _mask(draw, (batch, n))}

        return make, lambda m, i: m(i["data"], attention_mask=i["mask"]).logits, "mask", False
    if name == "optical-flow-perceiver":
        def make(draw, batch, gen):
            frames = _choice(draw, [3, 27])
            return {"data": torch.randn(batch, 2, frames, *c.train_size, generator=gen)}

        return make, lambda m, i: m(i["data"]).flow, None, True
    if name == "multimodal-perceiver":
        def make(draw, batch, gen):
            return {"data": torch.rand(batch, c.num_frames, c.in_channels, *c.image_size, generator=gen),
                    "audio": torch.rand(batch, c.num_audio_samples, generator=gen) * 2 - 1}

        def run(m, i):
            out = m({"image": i["data"], "audio": i["audio"]}).logits
            return torch.cat([out[k].flatten(1) for k in sorted(out)], dim=1)

        return make, run, None, True
    raise KeyError(f"no input builder for the registered model {name!r}; add one to tests/reliability/_zoo.py")


def registry(name: str, seed: int = 0) -> Case:
    model = _perturb(perceivers.create_model(name, tiny=True), seed)
    make, run, mask_key, float_data = _registry_make(name, model)
    return Case(name, model, make, run, mask_key=mask_key, float_data=float_data, config={"name": name})


REGISTRY = st.sampled_from(perceivers.list_models()).map(lambda n: {"name": n})
REGISTRY_MASKED = st.sampled_from(perceivers.list_models("language-*")).map(lambda n: {"name": n})

# kind → (config strategy, builder)
CONFIGS: dict[str, tuple[st.SearchStrategy, Callable[..., Case]]] = {
    "perceiver": (PERCEIVER, perceiver),
    "variant": (VARIANT, variant),
    "perceiver_io": (IO, perceiver_io),
    "perceiver_lm": (LM, perceiver_lm),
    "multimodality": (MULTIMODAL, multimodality),
    "io_model": (ENCODER, io_model),
    "registry": (REGISTRY, lambda cfg, seed=0: registry(cfg["name"], seed)),
    "registry_text": (REGISTRY_MASKED, lambda cfg, seed=0: registry(cfg["name"], seed)),
}
KINDS = sorted(set(CONFIGS) - {"registry_text"})
MASKED_KINDS = ["io_model", "multimodality", "perceiver", "perceiver_io", "perceiver_lm", "registry_text", "variant"]
SET_KINDS = ["io_model", "perceiver", "perceiver_io", "variant"]


def beyond_float16(case: Case, inputs: dict[str, Tensor], dtype: torch.dtype) -> bool:
    """Whether the exact (float32) computation itself leaves float16's range (max 65504).

    Raw inputs at scale 1e4 that meet a wide linear map before any normalisation (the conv stem sums
    7×7×3 = 147 products, the optical-flow patch ``Linear`` 54) can have exact activations beyond
    65504; then no float16 computation can be finite. Measured with hooks on every module's output and
    on every parameter gradient of a float32 copy of the model, on the same inputs and loss.
    """
    if dtype != torch.float16:
        return False
    model = copy.deepcopy(case.model).float()
    peak = [0.0]

    def hook(module, args, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.is_floating_point() and t.numel():
                peak[0] = max(peak[0], float(t.detach().abs().max()))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        out = case.run(model, {k: v.detach().float() if v.is_floating_point() else v for k, v in inputs.items()})
        hook(None, None, out)
        out.square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    grads = [float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None and p.grad.numel()]
    return max([peak[0], *grads]) > torch.finfo(torch.float16).max


def draw_case(data, kinds=KINDS, *, seed: int | None = None, overrides: dict | None = None) -> Case:
    """Draw a model kind, a configuration of it (``overrides`` fix fields it has), and build it."""
    kind = data.draw(st.sampled_from(list(kinds)), label="kind")
    strategy, build = CONFIGS[kind]
    cfg = data.draw(strategy, label=f"{kind} config")
    cfg.update({k: v for k, v in (overrides or {}).items() if k in cfg})
    seed = seed if seed is not None else data.draw(st.integers(0, 2**16), label="seed")
    with torch.random.fork_rng():  # the initial weights too follow the draws: a failing example reproduces
        torch.manual_seed(seed)
        return build(cfg, seed)
