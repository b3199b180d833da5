"""Benchmark workloads: the same configuration built by perceivers and by each peer that expresses it.

A :class:`Workload` builds one model per implementation (``build(impl, device)``); peers are built
first and perceivers' model is loaded with *their* weights where a converter exists, so that the
benchmark also checks that the outputs agree (``check``). Every builder is seeded.

Optional peers live outside the environment's site-packages (``peer_unavailable`` says why one is
skipped): krasserm's perceiver-io, in ``.venv/refs``, runs the DeepMind-layout workloads with the
transformers model's weights mapped into its modules, and its Perceiver AR; kklemon's FlashPerceiver
(its torch path on CPU) and lucidrains' perceiver-ar-pytorch, in ``.venv/refs`` too, run their own
configurations. Without a peer's folder, perceivers runs those workloads alone with its own weights; so it does
without perceiver-pytorch or transformers (the `test` extra), except where its model is assembled from
transformers' modules (``io-dm-2048x128``: skipped then, :class:`Unavailable`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

OURS = "perceivers"
LR = "perceiver-pytorch"
HF = "transformers"
KR = "krasserm/perceiver-io"  # optional peer: PyPI perceiver-io, installed by `make setup` into .venv/refs
KR_VERSION = "0.6.0"  # the newest release that installs on Python 3.11 (later ones require < 3.11)
KR_REFS = Path(sys.prefix) / "refs" / f"perceiver-io-{KR_VERSION}"
FP = "kklemon/flash-perceiver"  # optional peer: flash-perceiver 0.2.0 + flash-attn 2.8.3.post2's python code
FP_REFS = Path(sys.prefix) / "refs" / "flash-perceiver-0.2.0"
AR_LR = "lucidrains/perceiver-ar-pytorch"  # optional peer: perceiver-ar-pytorch 0.0.10 (pure torch)
AR_LR_REFS = Path(sys.prefix) / "refs" / "perceiver-ar-pytorch-0.0.10"

GiB = 2**30

# peers installed as Python packages (the `test` extra): implementation → (module, distribution)
_PACKAGES = {LR: ("perceiver_pytorch", "perceiver-pytorch"), HF: ("transformers", "transformers")}


class Unavailable(RuntimeError):
    """An implementation of a workload cannot be built here (a package it needs is missing): reported as skipped."""


@dataclass
class Built:
    """One implementation of a workload, ready to run."""

    model: nn.Module
    run: Callable[[nn.Module, tuple], Tensor]  # (model, inputs) -> output
    note: str = ""


@dataclass
class Workload:
    name: str
    family: str
    description: str
    batch: int
    elements: int  # input elements (positions) per sample
    impls: tuple[str, ...]
    build: Callable[[str, torch.device], Built]
    inputs: Callable[[int, torch.device], tuple]  # (batch, device) -> inputs
    train: bool = True
    tags: frozenset[str] = field(default_factory=frozenset)
    # rough peak-memory model (bytes) of each peer's forward, to skip cases that cannot fit
    estimate: Callable[[str, int], float] | None = None
    check: bool = True  # compare the outputs of the implementations
    heavy: bool = False  # one timed run, no warm-up, no FLOP counting, one pass in the memory process


# ---------------------------------------------------------------------------- perceiver-pytorch family

README_PERCEIVER = {
    "input_channels": 3, "input_axis": 2, "num_freq_bands": 6, "max_freq": 10.0, "depth": 6, "num_latents": 256, "latent_dim": 512,
    "cross_heads": 1, "latent_heads": 8, "cross_dim_head": 64, "latent_dim_head": 64, "num_classes": 1000, "attn_dropout": 0.0,
    "ff_dropout": 0.0, "weight_tie_layers": False, "fourier_encode_data": True, "self_per_cross_attn": 2,
}
README_IO = {
    "dim": 32, "queries_dim": 32, "logits_dim": 100, "depth": 6, "num_latents": 256, "latent_dim": 512, "cross_heads": 1,
    "latent_heads": 8, "cross_dim_head": 64, "latent_dim_head": 64, "weight_tie_layers": False,
}


def _seeded(fn):
    torch.manual_seed(0)
    return fn()


def _lr_family_builder(kind: str, cfg: dict) -> Callable[[str, torch.device], Built]:
    """perceiver-pytorch builds first; perceivers loads its weights through the converter (without perceiver-pytorch:
    perceivers alone, its own seeded initialisation)."""

    def build(impl: str, device: torch.device) -> Built:
        import perceivers
        from perceivers.convert import from_lucidrains

        ours_cls = perceivers.Perceiver if kind == "perceiver" else perceivers.PerceiverIO
        if kind == "perceiver":
            run = lambda m, inp: m(inp[0])
        else:
            run = lambda m, inp: m(inp[0], queries=inp[1])
        if peer_unavailable(LR):
            if impl == LR:
                raise Unavailable(peer_unavailable(LR))
            return Built(_seeded(lambda: ours_cls(**cfg)).to(device), run, note="own init")
        import perceiver_pytorch

        peer_cls = perceiver_pytorch.Perceiver if kind == "perceiver" else perceiver_pytorch.PerceiverIO
        peer = _seeded(lambda: peer_cls(**cfg))
        if impl == LR:
            return Built(peer.to(device), run)
        ours = ours_cls(**cfg)
        ours.load_state_dict(from_lucidrains(peer.state_dict()))
        del peer
        return Built(ours.to(device), run)

    return build


def _image_inputs(side: int, channels: int = 3, channels_last: bool = True):
    def make(batch: int, device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, side, side, channels, generator=g)
        return ((x if channels_last else x.permute(0, 3, 1, 2).contiguous()).to(device),)

    return make


def _lr_perceiver_estimate(cfg: dict, side: int) -> Callable[[str, int], float]:
    """perceiver-pytorch materialises [B·h, latents, M] similarities (sim, softmax, dropout copy)."""

    def est(impl: str, batch: int) -> float:
        m = side * side
        c = cfg["input_channels"] + cfg["input_axis"] * (2 * cfg["num_freq_bands"] + 1)
        attn = 3 * batch * cfg["cross_heads"] * cfg["num_latents"] * m * 4
        ctx = batch * m * (c * 3 + 2 * cfg["cross_heads"] * cfg["cross_dim_head"]) * 4
        return attn + ctx if impl != OURS else 0.0

    return est


def perceiver_workload(name: str, side: int, batch: int, *, depth: int = 6, tied: bool = False,
                       train: bool = True, tags: tuple[str, ...] = (), impls=(OURS, LR), check: bool = True,
                       description: str | None = None, heavy: bool = False) -> Workload:
    cfg = dict(README_PERCEIVER, depth=depth, weight_tie_layers=tied)
    desc = description or (f"perceiver-pytorch README Perceiver (depth {depth}, {'tied' if tied else 'untied'}), "
                           f"{side}×{side}×3 images")
    return Workload(
        name=name, family="perceiver", description=desc, batch=batch, elements=side * side, impls=tuple(impls),
        build=_lr_family_builder("perceiver", cfg), inputs=_image_inputs(side), train=train,
        tags=frozenset(tags), estimate=_lr_perceiver_estimate(cfg, side), check=check, heavy=heavy,
    )


def io_lr_workload(name: str, inputs: int, queries: int, batch: int, tags: tuple[str, ...] = ()) -> Workload:
    cfg = README_IO

    def make(b: int, device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(1)
        return (torch.randn(b, inputs, cfg["dim"], generator=g).to(device),
                torch.randn(queries, cfg["queries_dim"], generator=g).to(device))

    return Workload(
        name=name, family="perceiver-io (perceiver-pytorch layout)",
        description=f"perceiver-pytorch README PerceiverIO (depth 6), {inputs} inputs × {cfg['dim']} ch, "
                    f"{queries} queries",
        batch=batch, elements=inputs, impls=(OURS, LR), build=_lr_family_builder("io", cfg), inputs=make,
        tags=frozenset(tags),
    )


# ---------------------------------------------------------------------------- DeepMind / transformers family


def _hf_config(**kw):
    from transformers import PerceiverConfig

    kw.setdefault("attention_probs_dropout_prob", 0.0)
    return PerceiverConfig(**kw)


def _via_create_model(name: str, overrides: dict, hf) -> nn.Module | None:
    """perceivers' own official model with the transformers weights, when the library has it."""
    import perceivers

    create = getattr(perceivers, "create_model", None)
    load = getattr(perceivers, "load_checkpoint", None)
    if create is None or load is None or os.environ.get("PERCEIVERS_BENCH_NO_CREATE_MODEL"):
        return None
    try:
        model = create(name, **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            load(model, tmp)
        return model
    except Exception as exc:  # noqa: BLE001 - fall back to the layers-built equivalent
        print(f"[bench] create_model({name!r}) unavailable for this workload ({type(exc).__name__}: {exc}); "
              "using the layers-built equivalent")
        return None


def _dm_builder(kind: str, hf_kwargs: dict, registry_name: str | None = None,
                overrides: dict | None = None, io_queries: int = 128, io_out: int = 100, side: int | None = None):
    def make_hf():
        import transformers.models.perceiver.modeling_perceiver as hfm

        config = _hf_config(**hf_kwargs)
        if kind == "image":
            return hfm.PerceiverForImageClassificationFourier(config)
        if kind == "mlm":
            return hfm.PerceiverForMaskedLM(config)
        decoder = hfm.PerceiverBasicDecoder(
            config, output_num_channels=io_out, position_encoding_type="trainable", output_index_dims=io_queries,
            num_channels=config.d_model, use_query_residual=False, final_project=True,
            trainable_position_encoding_kwargs={"num_channels": config.d_model, "index_dims": io_queries},
        )
        return hfm.PerceiverModel(config, decoder=decoder)

    def build(impl: str, device: torch.device) -> Built:
        missing = peer_unavailable(HF)
        if missing:  # perceivers alone, its own seeded model, where the library has it
            if impl != OURS or not registry_name:
                raise Unavailable(missing if impl == HF else f"built from transformers' model here, and {missing}")
            import perceivers

            model = _seeded(lambda: perceivers.create_model(registry_name, **(overrides or {})))
            key = "pixel_values" if kind == "image" else "inputs"
            return Built(model.to(device), lambda m, inp: _logits(m(**{key: inp[0]})), note="own init")
        from dm_equiv import DMImageFourier, DMMaskedLM, DMPerceiverIO

        hf = _seeded(make_hf).eval()
        if kind == "image":
            hf_run = lambda m, inp: m(pixel_values=inp[0]).logits
        elif kind == "mlm":
            hf_run = lambda m, inp: m(inputs=inp[0]).logits
        else:
            hf_run = lambda m, inp: m(inputs=inp[0]).logits
        if impl == HF:
            return Built(hf.to(device), hf_run)
        if impl == KR:
            model, run = _kr_model(kind, hf, side)
            del hf
            return Built(model.to(device), run, note=f"perceiver-io {KR_VERSION}, transformers' weights")
        ours = _via_create_model(registry_name, overrides or {}, hf) if registry_name else None
        if ours is not None:
            key = "pixel_values" if kind == "image" else "inputs"
            return Built(ours.to(device), lambda m, inp: _logits(m(**{key: inp[0]})),
                         note=f"perceivers.create_model({registry_name!r})")
        cls = {"image": DMImageFourier, "mlm": DMMaskedLM, "io": DMPerceiverIO}[kind]
        ours = cls(hf)
        del hf
        return Built(ours.to(device), lambda m, inp: m(inp[0]), note="built from perceivers.layers")

    return build


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _hf_estimate(channels: int, num_latents: int, qk: int, v: int, heads: int = 1):
    def est(impl: str, batch: int, m: int) -> float:
        if impl == OURS:
            return 0.0
        ctx = batch * m * (channels * 3 + qk + v) * 4
        attn = 3 * batch * heads * num_latents * m * 4
        return ctx + attn

    return est


# ---------------------------------------------------------------------------- optional peers; krasserm/perceiver-io


# optional peers: refs folder, package, what `make setup` installs there
_REFS = {KR: (KR_REFS, "perceiver", f"perceiver-io=={KR_VERSION}"),
         FP: (FP_REFS, "flash_perceiver", "flash-perceiver==0.2.0 and flash-attn==2.8.3.post2 (python code)"),
         AR_LR: (AR_LR_REFS, "perceiver_ar_pytorch", "perceiver-ar-pytorch==0.0.10")}


def _ref_missing(impl: str) -> str | None:
    refs, package, what = _REFS[impl]
    if not (refs / package).is_dir():
        return f"{refs} not found (make setup installs {what} there with --no-deps)"
    return None


def peer_unavailable(impl: str, device: torch.device | None = None) -> str | None:
    """Why a peer cannot run in this environment (``None``: it can)."""
    if impl in _PACKAGES:
        module, dist = _PACKAGES[impl]
        if importlib.util.find_spec(module) is None:
            return f"{dist} is not installed (pip install 'perceivers[test]' installs it)"
        try:
            importlib.import_module(module)
        except ImportError as exc:  # installed but broken (e.g. a dependency missing)
            return f"{dist} cannot be imported ({type(exc).__name__}: {exc})"
        return None
    if impl not in _REFS:
        return None
    why = _ref_missing(impl)
    if why is None and impl == FP and device is not None and device.type == "cuda" and not _flash_attn_cuda():
        why = ("flash-attn's CUDA extension (flash_attn_2_cuda) is not installed: .venv/refs holds flash-attn's "
               "python code only, so FlashPerceiver would run its unfused torch path on the GPU")
    return why


def _krasserm():
    """krasserm's ``perceiver`` package (perceiver-io 0.6.0) from its refs folder.

    Its core modules import ``fairscale.nn.checkpoint_wrapper`` at module level but call it only with
    ``activation_checkpointing=True``, which the benchmark never sets; fairscale is not a dependency of
    perceivers, so when it is missing a stand-in that refuses to be called is present during the import only.
    """
    if "perceiver.model.text.mlm" not in sys.modules:  # the last of the imports below
        why = peer_unavailable(KR)
        if why:
            raise RuntimeError(why)
        if str(KR_REFS) not in sys.path:
            sys.path.append(str(KR_REFS))
        stand_in = importlib.util.find_spec("fairscale") is None
        if stand_in:
            def checkpoint_wrapper(*args, **kwargs):
                raise NotImplementedError("activation checkpointing of krasserm/perceiver-io needs fairscale")

            fs, fs_nn = types.ModuleType("fairscale"), types.ModuleType("fairscale.nn")
            fs_nn.checkpoint_wrapper, fs.nn = checkpoint_wrapper, fs_nn
            sys.modules.update({"fairscale": fs, "fairscale.nn": fs_nn})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import perceiver.model.core  # config, modules, Lightning wrappers
                import perceiver.model.core.classifier
                import perceiver.model.image.classifier
                import perceiver.model.text.mlm  # noqa: F401
        finally:
            if stand_in:
                sys.modules.pop("fairscale.nn", None)
                sys.modules.pop("fairscale", None)
    return sys.modules["perceiver"]


_KR_LAYER = {
    "attention.self.query": "attention.q_proj", "attention.self.key": "attention.k_proj",
    "attention.self.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
}


def _kr_layer(sd: dict, src: str, dst: str, *, cross: bool, residual: bool = True) -> dict:
    """One transformers ``PerceiverLayer`` (``src``) as krasserm's Cross/SelfAttentionLayer (``dst``)."""
    att = f"{dst}.0.module" if residual else f"{dst}.0"
    names = {k: f"{att}.{v}" for k, v in _KR_LAYER.items()}
    names["attention.self.layernorm1"] = f"{att}.q_norm" if cross else f"{att}.norm"
    if cross:
        names["attention.self.layernorm2"] = f"{att}.kv_norm"
    names.update({"layernorm": f"{dst}.1.module.0", "mlp.dense1": f"{dst}.1.module.1",
                  "mlp.dense2": f"{dst}.1.module.3"})
    return {f"{v}.{p}": sd[f"{src}.{k}.{p}"] for k, v in names.items() for p in ("weight", "bias")}


def _kr_state_dict(kind: str, hf: nn.Module) -> dict:
    """transformers' state dict in krasserm's key layout (``0.`` = encoder, ``1.`` = decoder)."""
    sd, cfg = hf.state_dict(), hf.config
    p = "" if kind == "io" else "perceiver."  # the io workload runs a bare PerceiverModel
    dec = f"{p}decoder.decoder" if kind == "image" else f"{p}decoder"
    out = {"0.latent": sd[f"{p}embeddings.latents"],
           "1.output_adapter._output_query": sd[f"{dec}.output_position_encodings.position_embeddings"]}
    out |= _kr_layer(sd, f"{p}encoder.cross_attention", "0.cross_attn_1", cross=True,
                     residual=cfg.use_query_residual)
    for i in range(cfg.num_self_attends_per_block):
        out |= _kr_layer(sd, f"{p}encoder.self_attends.{i}", f"0.self_attn_1.{i}", cross=False)
    out |= _kr_layer(sd, f"{dec}.decoding_cross_attention", "1.cross_attn", cross=True, residual=kind == "image")
    if kind == "mlm":
        out["0.input_adapter.txt_embedding.weight"] = sd["perceiver.input_preprocessor.embeddings.weight"]
        out["0.input_adapter.pos_encoding"] = sd["perceiver.input_preprocessor.position_embeddings.weight"]
        out["1.output_adapter.bias"] = sd["embedding_decoder.bias"]
    else:
        out["1.output_adapter.linear.weight"] = sd[f"{dec}.final_layer.weight"]
        out["1.output_adapter.linear.bias"] = sd[f"{dec}.final_layer.bias"]
    return out


def _kr_model(kind: str, hf: nn.Module, side: int | None = None) -> tuple[nn.Module, Callable]:
    """krasserm's model for a transformers Perceiver, loaded with its weights; returns (model, run)."""
    kp = _krasserm()
    core = kp.model.core
    cfg = hf.config
    if kind == "mlm":
        txt = kp.model.text.mlm
        dec = hf.perceiver.decoder.decoding_cross_attention.attention.self
        encoder = kp.model.text.common.TextEncoderConfig(
            vocab_size=cfg.vocab_size, max_seq_len=cfg.max_position_embeddings, num_input_channels=cfg.d_model,
            num_cross_attention_heads=cfg.num_cross_attention_heads, num_cross_attention_qk_channels=cfg.qk_channels,
            num_cross_attention_v_channels=cfg.v_channels, num_self_attention_heads=cfg.num_self_attention_heads,
            num_self_attention_qk_channels=cfg.qk_channels, num_self_attention_v_channels=cfg.v_channels,
            num_self_attention_layers_per_block=cfg.num_self_attends_per_block, num_self_attention_blocks=cfg.num_blocks,
            cross_attention_widening_factor=cfg.cross_attention_widening_factor,
            self_attention_widening_factor=cfg.self_attention_widening_factor,
        )
        decoder = txt.TextDecoderConfig(
            vocab_size=cfg.vocab_size, max_seq_len=cfg.max_position_embeddings, num_cross_attention_heads=dec.num_heads,
            num_cross_attention_qk_channels=dec.qk_channels, num_cross_attention_v_channels=dec.v_channels,
            cross_attention_residual=False,
        )
        model = txt.MaskedLanguageModel(core.PerceiverConfig(encoder, decoder, cfg.num_latents, cfg.d_latents))
        run = lambda m, inp: m(inp[0])
    elif kind == "image":
        img = kp.model.image.classifier
        encoder = img.ImageEncoderConfig(
            image_shape=(side, side, 3), num_frequency_bands=64, num_cross_attention_heads=cfg.num_cross_attention_heads,
            num_self_attention_heads=cfg.num_self_attention_heads,
            num_self_attention_layers_per_block=cfg.num_self_attends_per_block, num_self_attention_blocks=cfg.num_blocks,
        )
        decoder = core.ClassificationDecoderConfig(
            num_classes=cfg.num_labels, num_output_query_channels=cfg.d_latents,
            num_cross_attention_heads=cfg.num_cross_attention_heads,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.meshgrid's indexing warning
            model = img.ImageClassifier(core.PerceiverConfig(encoder, decoder, cfg.num_latents, cfg.d_latents))
            # transformers' Fourier classifier fixes the bands' maximum resolution at 224² for every image size;
            # krasserm's derives it from the image shape, so its (precomputed) encoding is rebuilt for 224².
            adapter = model.encoder.input_adapter
            enc = adapter._position_encodings(adapter._positions(), max_frequencies=(224, 224))
            adapter.position_encoding = enc.reshape(-1, enc.shape[-1])
        run = lambda m, inp: m(inp[0].permute(0, 2, 3, 1))  # channels-last, as krasserm's adapter expects
    else:
        enc_att = hf.encoder.cross_attention.attention.self
        dec_att = hf.decoder.decoding_cross_attention.attention.self
        queries = hf.decoder.output_position_encodings.position_embeddings

        class Identity(core.InputAdapter):
            def forward(self, x):
                return x

        encoder = core.PerceiverEncoder(
            Identity(cfg.d_model), cfg.num_latents, cfg.d_latents,
            num_cross_attention_heads=enc_att.num_heads, num_cross_attention_qk_channels=enc_att.qk_channels,
            num_cross_attention_v_channels=enc_att.v_channels, num_self_attention_heads=cfg.num_self_attention_heads,
            num_self_attention_layers_per_block=cfg.num_self_attends_per_block, num_self_attention_blocks=cfg.num_blocks,
        )
        adapter = core.classifier.ClassificationOutputAdapter(
            num_classes=hf.decoder.final_layer.out_features, num_output_queries=queries.shape[0],
            num_output_query_channels=queries.shape[1],
        )
        decoder = core.PerceiverDecoder(
            adapter, cfg.d_latents, num_cross_attention_heads=dec_att.num_heads,
            num_cross_attention_qk_channels=dec_att.qk_channels, num_cross_attention_v_channels=dec_att.v_channels,
            cross_attention_residual=False,
        )
        model = core.PerceiverIO(encoder, decoder)
        run = lambda m, inp: m(inp[0])
    sd = _kr_state_dict(kind, hf)
    sd |= {k: v for k, v in model.state_dict().items() if k not in sd and k.endswith("position_encoding")}
    model.load_state_dict(sd, strict=True)
    return model, run


VISION_OFFICIAL = {"num_latents": 512, "d_latents": 1024, "d_model": 261, "num_blocks": 8, "num_self_attends_per_block": 6,
                       "num_self_attention_heads": 8, "num_cross_attention_heads": 1, "num_labels": 1000, "image_size": 224}
VISION_REDUCED = dict(VISION_OFFICIAL, num_latents=128, d_latents=256, num_blocks=2, num_self_attends_per_block=2)
LANGUAGE_OFFICIAL = {"num_latents": 256, "d_latents": 1280, "d_model": 768, "num_blocks": 1, "num_self_attends_per_block": 26,
                         "num_self_attention_heads": 8, "num_cross_attention_heads": 8, "qk_channels": 256, "v_channels": 1280,
                         "vocab_size": 262, "max_position_embeddings": 2048}
LANGUAGE_REDUCED = dict(LANGUAGE_OFFICIAL, num_latents=128, d_latents=256, d_model=256, num_self_attends_per_block=4,
                        qk_channels=256, v_channels=256)


def vision_workload(name: str, hf_kwargs: dict, side: int, batch: int, *, train: bool = True,
                    tags: tuple[str, ...] = (), description: str = "", check: bool = True) -> Workload:
    overrides = {k: v for k, v in hf_kwargs.items() if k != "d_model"}
    est = _hf_estimate(261, hf_kwargs["num_latents"], 261, 261)
    return Workload(
        name=name, family="perceiver-io (DeepMind layout)",
        description=description or f"Fourier vision Perceiver IO, {side}×{side}×3",
        batch=batch, elements=side * side, impls=(OURS, HF, KR),
        build=_dm_builder("image", hf_kwargs, "vision-perceiver-fourier", overrides, side=side),
        inputs=_image_inputs(side, channels_last=False), train=train, tags=frozenset(tags),
        estimate=lambda impl, b: est(impl, b, side * side), check=check,
    )


def language_workload(name: str, hf_kwargs: dict, batch: int, *, train: bool = True, tags: tuple[str, ...] = (),
                      description: str = "") -> Workload:
    seq = hf_kwargs["max_position_embeddings"]

    def make(b: int, device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(1)
        return (torch.randint(0, hf_kwargs["vocab_size"], (b, seq), generator=g).to(device),)

    return Workload(
        name=name, family="perceiver-io (DeepMind layout)", description=description, batch=batch, elements=seq,
        impls=(OURS, HF, KR), build=_dm_builder("mlm", hf_kwargs, "language-perceiver", dict(hf_kwargs)),
        inputs=make, train=train, tags=frozenset(tags),
    )


def io_hf_workload(name: str, inputs: int, queries: int, batch: int, tags: tuple[str, ...] = ()) -> Workload:
    kw = {"num_latents": 256, "d_latents": 512, "d_model": 32, "num_blocks": 1, "num_self_attends_per_block": 6,
              "num_self_attention_heads": 8, "num_cross_attention_heads": 1}

    def make(b: int, device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(1)
        return (torch.randn(b, inputs, kw["d_model"], generator=g).to(device),)

    return Workload(
        name=name, family="perceiver-io (DeepMind layout)",
        description=f"transformers PerceiverModel + basic decoder (256×512 latents, 6 self-attends), {inputs} "
                    f"inputs × 32 ch, {queries} trainable queries",
        batch=batch, elements=inputs, impls=(OURS, HF, KR), build=_dm_builder("io", kw, io_queries=queries),
        inputs=make, tags=frozenset(tags),
    )


# ---------------------------------------------------------------------------- FlashPerceiver, Perceiver AR (optional peers)

def _flash_attn_cuda() -> bool:
    """Whether flash-attn's compiled CUDA extension is installed (the refs folder holds its python code only)."""
    ext = sys.modules.get("flash_attn_2_cuda")
    if ext is not None:
        return getattr(ext, "__file__", None) is not None  # not the empty stand-in of _flash_perceiver()
    return importlib.util.find_spec("flash_attn_2_cuda") is not None


def _flash_perceiver():
    """kklemon's ``flash_perceiver`` package from its refs folder, importable without CUDA.

    FlashPerceiver imports flash-attn at module level, and flash-attn imports its CUDA extension, torchvision
    (``StochasticDepth``) and triton (rotary). Its torch path (``use_flash_attn=False``) calls none of them
    for the configurations here (no drop path, no rotary), so stand-ins take their place when they are
    missing: an empty ``flash_attn_2_cuda`` (it stays: flash-attn binds it at import), and for the import
    only an identity ``StochasticDepth`` (p=0) and a triton rotary that refuses to be called.
    """
    if "flash_perceiver.perceiver" not in sys.modules:
        why = _ref_missing(FP)
        if why:
            raise RuntimeError(why)
        if str(FP_REFS) not in sys.path:
            sys.path.append(str(FP_REFS))
        if importlib.util.find_spec("flash_attn_2_cuda") is None:
            sys.modules.setdefault("flash_attn_2_cuda", types.ModuleType("flash_attn_2_cuda"))
        added = {}
        if importlib.util.find_spec("torchvision") is None:
            class StochasticDepth(nn.Module):
                def __init__(self, p: float, mode: str) -> None:
                    super().__init__()
                    if p != 0:
                        raise NotImplementedError("the StochasticDepth stand-in is the identity (p=0) only")

                def forward(self, x):
                    return x

            tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
            ops.StochasticDepth, tv.ops = StochasticDepth, ops
            added |= {"torchvision": tv, "torchvision.ops": ops}
        if importlib.util.find_spec("triton") is None:
            def apply_rotary(*args, **kwargs):
                raise NotImplementedError("flash-attn's rotary kernel needs triton")

            rotary = types.ModuleType("flash_attn.ops.triton.rotary")
            rotary.apply_rotary = apply_rotary
            sys.modules["flash_attn.ops.triton.rotary"] = rotary  # stays: flash_attn.ops.triton needs triton
        sys.modules.update(added)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import flash_perceiver.perceiver  # noqa: F401
        finally:
            for name in added:
                sys.modules.pop(name, None)
    return sys.modules["flash_perceiver"]


def _perceiver_ar_lucidrains():
    """lucidrains' ``perceiver_ar_pytorch`` (0.0.10) from its refs folder (pure torch + einops)."""
    why = _ref_missing(AR_LR)
    if why:
        raise RuntimeError(why)
    if str(AR_LR_REFS) not in sys.path:
        sys.path.append(str(AR_LR_REFS))
    import perceiver_ar_pytorch

    return perceiver_ar_pytorch


# FlashPerceiver's own benchmark model (run_benchmarks.py, see its README): no Fourier features, no head.
FLASH_BENCH = {"input_dim": 128, "depth": 8, "latent_dim": 256, "num_latents": 256}


def _flash_builder(cfg: dict) -> Callable[[str, torch.device], Built]:
    """FlashPerceiver builds first (seeded); perceivers' ``flash_perceiver.Perceiver`` loads its state dict strictly."""

    def build(impl: str, device: torch.device) -> Built:
        from perceivers import flash_perceiver

        flash = device.type == "cuda" and _flash_attn_cuda()
        kwargs = dict(cfg, use_flash_attn=flash)
        run = lambda m, inp: m(inp[0])
        if _ref_missing(FP):  # no reference here: perceivers alone, with its own (seeded) initialisation
            if impl == FP:
                raise RuntimeError(_ref_missing(FP))
            return Built(_seeded(lambda: flash_perceiver.Perceiver(**kwargs)).to(device), run, note="own init")
        peer = _seeded(lambda: _flash_perceiver().Perceiver(**kwargs))
        if impl == FP:
            path = "flash-attn kernels" if flash else "torch path (use_flash_attn=False)"
            return Built(peer.to(device), run, note=f"flash-perceiver 0.2.0, {path}")
        ours = flash_perceiver.Perceiver(**kwargs)
        ours.load_state_dict(peer.state_dict(), strict=True)
        del peer
        return Built(ours.to(device), run, note="perceivers.flash_perceiver.Perceiver")

    return build


def flash_workload(name: str, tokens: int, batch: int, tags: tuple[str, ...] = ()) -> Workload:
    cfg = dict(FLASH_BENCH)

    def make(b: int, device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(1)
        return (torch.randn(b, tokens, cfg["input_dim"], generator=g).to(device),)

    return Workload(
        name=name, family="FlashPerceiver",
        description=f"FlashPerceiver's benchmark model (depth 8, 256×256 latents, gated MLP), {tokens} tokens × "
                    f"{cfg['input_dim']} ch",
        batch=batch, elements=tokens, impls=(OURS, FP), build=_flash_builder(cfg), inputs=make,
        tags=frozenset(tags),
    )


def _token_inputs(vocab: int, seq: int):
    def make(b: int, device: torch.device) -> tuple:
        g = torch.Generator().manual_seed(1)
        return (torch.randint(0, vocab, (b, seq), generator=g).to(device),)

    return make


def _krasserm_clm():
    """krasserm's ``perceiver.model.text.clm`` (perceiver-io 0.6.0): the core package first, then the module."""
    _krasserm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from perceiver.model.text import clm
    return clm


def _ar_krasserm_builder(fields: dict) -> Callable[[str, torch.device], Built]:
    """krasserm's CausalLanguageModel builds first; perceivers loads it through ``convert.krasserm``."""

    def build(impl: str, device: torch.device) -> Built:
        from perceivers.convert.krasserm import load_krasserm_perceiver_ar
        from perceivers.models.perceiver_ar import CausalLanguageModel, CausalLanguageModelConfig

        run = lambda m, inp: m(inp[0])  # logits [B, num_latents, vocab]
        ours_model = lambda: CausalLanguageModel(CausalLanguageModelConfig(**fields))
        if peer_unavailable(KR):
            if impl == KR:
                raise RuntimeError(peer_unavailable(KR))
            return Built(_seeded(ours_model).to(device), run, note="own init")
        clm = _krasserm_clm()
        peer = _seeded(lambda: clm.CausalLanguageModel(clm.CausalLanguageModelConfig(**fields)))
        if impl == KR:
            return Built(peer.to(device), run, note=f"perceiver-io {KR_VERSION} CausalLanguageModel")
        ours = load_krasserm_perceiver_ar(ours_model(), peer.state_dict())
        del peer
        return Built(ours.to(device), run, note="perceivers.CausalLanguageModel, krasserm's weights")

    return build


# A reduced Perceiver AR (krasserm's perceiver-io CausalLanguageModel): bytes, 4096 positions, 512 latents.
AR_KRASSERM = {"vocab_size": 262, "max_seq_len": 4096, "num_latents": 512, "num_channels": 512, "num_heads": 8,
               "num_self_attention_layers": 6}


def ar_krasserm_workload(name: str, fields: dict, batch: int, tags: tuple[str, ...] = ()) -> Workload:
    return Workload(
        name=name, family="Perceiver AR",
        description=f"Perceiver AR CausalLanguageModel (krasserm layout: {fields['num_latents']} latents × "
                    f"{fields['num_channels']} ch, {fields['num_self_attention_layers']} self-attention layers, "
                    f"{fields['num_heads']} heads, prefix dropout 0.5 in training), {fields['max_seq_len']} tokens",
        batch=batch, elements=fields["max_seq_len"], impls=(OURS, KR), build=_ar_krasserm_builder(fields),
        inputs=_token_inputs(fields["vocab_size"], fields["max_seq_len"]), tags=frozenset(tags),
    )


def _ar_lucidrains_builder(cfg: dict) -> Callable[[str, torch.device], Built]:
    """lucidrains' PerceiverAR builds first; ``perceivers.perceiver_ar_pytorch.PerceiverAR`` loads its state dict."""

    def build(impl: str, device: torch.device) -> Built:
        from perceivers.perceiver_ar_pytorch import PerceiverAR

        run = lambda m, inp: m(inp[0])  # logits [B, max_seq_len - cross_attn_seq_len, num_tokens]
        if _ref_missing(AR_LR):
            if impl == AR_LR:
                raise RuntimeError(_ref_missing(AR_LR))
            return Built(_seeded(lambda: PerceiverAR(**cfg)).to(device), run, note="own init")
        peer = _seeded(lambda: _perceiver_ar_lucidrains().PerceiverAR(**cfg))
        if impl == AR_LR:
            return Built(peer.to(device), run, note="perceiver-ar-pytorch 0.0.10")
        ours = PerceiverAR(**cfg)
        ours.load_state_dict(peer.state_dict(), strict=True)
        del peer
        return Built(ours.to(device), run, note="perceivers.perceiver_ar_pytorch.PerceiverAR")

    return build


# perceiver-ar-pytorch's README model (its dropouts included), batch 1.
AR_LUCIDRAINS = {"num_tokens": 20000, "dim": 512, "depth": 8, "heads": 8, "dim_head": 64, "max_seq_len": 4096,
                 "cross_attn_seq_len": 3072, "cross_attn_dropout": 0.5}


def ar_lucidrains_workload(name: str, cfg: dict, batch: int, tags: tuple[str, ...] = ()) -> Workload:
    return Workload(
        name=name, family="Perceiver AR",
        description=f"perceiver-ar-pytorch README PerceiverAR (dim {cfg['dim']}, depth {cfg['depth']}, "
                    f"{cfg['heads']}×{cfg['dim_head']} heads, {cfg['num_tokens']} tokens vocabulary, prefix "
                    f"{cfg['cross_attn_seq_len']} with dropout {cfg.get('cross_attn_dropout', 0)} in training), "
                    f"{cfg['max_seq_len']} tokens",
        batch=batch, elements=cfg["max_seq_len"], impls=(OURS, AR_LR), build=_ar_lucidrains_builder(cfg),
        inputs=_token_inputs(cfg["num_tokens"], cfg["max_seq_len"]), tags=frozenset(tags),
    )


# ---------------------------------------------------------------------------- the list


def all_workloads() -> list[Workload]:
    w: list[Workload] = [
        perceiver_workload("readme-64-untied", 64, 8, tags=("quick", "readme")),
        perceiver_workload("readme-64-tied", 64, 8, tied=True, tags=("readme",)),
        perceiver_workload("readme-224-untied", 224, 2, tags=("readme",)),
        perceiver_workload("readme-224-tied", 224, 2, tied=True, tags=("readme",)),
        io_lr_workload("io-2048x128", 2048, 128, 8, tags=("quick", "io")),
        io_hf_workload("io-dm-2048x128", 2048, 128, 8, tags=("quick", "io")),
    ]
    for side in (32, 64, 128, 256, 512, 1024):
        w.append(perceiver_workload(
            f"sweep-perceiver-{side}", side, 1, depth=2, train=False, tags=("sweep",) + (("quick",) if side in (64, 1024) else ()),
            check=side <= 256,
            description=f"README Perceiver depth 2 untied, batch 1, {side}×{side}×3 ({side * side} inputs)",
        ))
    for side in (2048, 4096):
        w.append(perceiver_workload(
            f"sweep-perceiver-{side}", side, 1, depth=2, train=False, tags=("sweep", "huge"), impls=(OURS, LR),
            check=False, heavy=True,
            description=f"README Perceiver depth 2 untied, batch 1, {side}×{side}×3 ({side * side} inputs)",
        ))
    for side in (32, 64, 128, 256, 512, 1024):
        w.append(vision_workload(
            f"sweep-io-{side}", VISION_REDUCED, side, 1, train=False, tags=("sweep",), check=side <= 256,
            description=f"Fourier vision Perceiver IO (128×256 latents, 2×2 self-attends), batch 1, {side}×{side}×3",
        ))
    w += [
        vision_workload("vision-fourier-reduced", VISION_REDUCED, 224, 2, tags=("official",),
                        description="Fourier vision Perceiver IO, reduced (128×256 latents, 2×2 self-attends), 224²"),
        vision_workload("vision-fourier-official", VISION_OFFICIAL, 224, 1, tags=("official", "large"),
                        description="Fourier vision Perceiver IO, official size (512×1024 latents, 8×6 self-attends)"),
        language_workload("language-reduced", LANGUAGE_REDUCED, 2, tags=("official",),
                          description="language Perceiver, reduced (128×256 latents, 4 self-attends), 2048 bytes"),
        language_workload("language-official", LANGUAGE_OFFICIAL, 1, tags=("official", "large"),
                          description="language Perceiver, official size (201M parameters), 2048 bytes"),
    ]
    for tokens, batch in ((1024, 16), (4096, 8), (16384, 4)):
        w.append(flash_workload(f"flash-perceiver-{tokens // 1024}k", tokens, batch,
                                tags=("flash-perceiver", "new-peers")))
    w += [
        ar_krasserm_workload("perceiver-ar-krasserm", AR_KRASSERM, 2, tags=("perceiver-ar", "new-peers")),
        ar_lucidrains_workload("perceiver-ar-lucidrains", AR_LUCIDRAINS, 1, tags=("perceiver-ar", "new-peers")),
    ]
    return w


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0"
    units = ["B", "KiB", "MiB", "GiB"]
    i = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**i:.2f} {units[i]}"
