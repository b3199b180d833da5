#!/usr/bin/env python
"""Before/after of each optimisation in perceivers, on the same model in one process, interleaved.

    python benchmarks/ablations.py [--quick] [--only fold stream ...]

Each study switches one optimisation off (the "before") and on (the "after") on the same weights
and times both interleaved; the memory study runs each variant in its own process. Results go to
``benchmarks/results/ablations-<machine>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure
import torch
import torch.nn.functional as F
from run import machine_tag

import perceivers
from perceivers.layers import Attention, native_activation, native_attention, onednn_attention, use_onednn

README = {"input_channels": 3, "input_axis": 2, "num_freq_bands": 6, "max_freq": 10.0, "depth": 6,
          "num_latents": 256, "latent_dim": 512, "cross_heads": 1, "latent_heads": 8, "cross_dim_head": 64,
          "latent_dim_head": 64, "num_classes": 1000, "self_per_cross_attn": 2}


def readme(depth: int = 6, tied: bool = False) -> perceivers.Perceiver:
    torch.manual_seed(0)
    return perceivers.Perceiver(**{**README, "depth": depth, "weight_tie_layers": tied}).eval()


def set_fold(model, value) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.fold_kv = value


def images(batch: int, side: int) -> torch.Tensor:
    return torch.randn(batch, side, side, 3, generator=torch.Generator().manual_seed(1))


def _output(model, x):
    """``model(x)``, or ``x()`` where the inputs are a call (a benchmark workload's own)."""
    return x() if callable(x) else model(x)


def forward(model, x):
    def fn():
        with torch.no_grad():
            _output(model, x)
    return fn


def train_step(model, x):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as benchmarks/run.py

    def fn():
        model.train()
        opt.zero_grad(set_to_none=True)
        out = _output(model, x)
        getattr(out, "logits", out).float().pow(2).mean().backward()
        opt.step()
        model.eval()
    return fn


def timed(cases: dict, repeats: int) -> dict:
    times = measure.alternate(cases, torch.device("cpu"), repeats=repeats)
    return {k: measure.summarize(v) for k, v in times.items()}


def with_fold(model, value, fn):
    def run():
        set_fold(model, value)
        fn()
    return run


def with_chunk(model, value, fn):
    def run():
        model.chunk_size = value
        fn()
    return run


# ------------------------------------------------------------------------------------------ studies


def study_fold(args) -> dict:
    """Attending in the input's own space (29 channels) instead of the head's (64 + 64)."""
    out = {}
    b = 2 if args.quick else 8
    m = readme()
    x = images(b, 64)
    out[f"readme-64 depth 6 inference (batch {b})"] = timed(
        {"before": with_fold(m, False, forward(m, x)), "after": with_fold(m, None, forward(m, x))}, args.repeats)
    out[f"readme-64 depth 6 training step (batch {b})"] = timed(
        {"before": with_fold(m, False, train_step(m, x)), "after": with_fold(m, None, train_step(m, x))},
        args.repeats)
    m2 = readme(depth=2)
    m2.chunk_size = 0
    x2 = images(1, 256)
    out["256x256 depth 2 inference (batch 1)"] = timed(
        {"before": with_fold(m2, False, forward(m2, x2)), "after": with_fold(m2, None, forward(m2, x2))},
        args.repeats)
    return out


def study_stream(args) -> dict:
    """Chunked cross-attention with per-chunk Fourier features, against the whole context at once."""
    out = {}
    m = readme(depth=2)
    for side in (256,) if args.quick else (256, 512):
        x = images(1, side)
        out[f"{side}x{side} depth 2 inference"] = timed(
            {"before": with_chunk(m, 0, forward(m, x)), "after": with_chunk(m, None, forward(m, x))}, args.repeats)
    return out


def study_tied_kv(args) -> dict:
    """Tied blocks share the context's normalisation and projection: prepared once, not per block.

    Measured as the forward time against the time of the preparations that sharing avoids (the
    ``depth - 2`` extra uses of the tied block), with and without the fold.
    """
    b = 2 if args.quick else 8
    m = readme(tied=True)
    x = images(b, 64)
    block = m.blocks[1]
    with torch.no_grad():
        context = m.build_context(x)
    reuses = sum(1 for u in m.block_order if u == 1) - 1
    out = {}
    for fold in (None, False):
        def prepare(fold=fold):
            set_fold(m, fold)
            with torch.no_grad():
                for _ in range(reuses):
                    block.prepare_context(context)

        res = timed({"forward": with_fold(m, fold, forward(m, x)), "extra": prepare}, args.repeats)
        f, p = res["forward"]["median_s"], res["extra"]["median_s"]
        label = "fold" if fold is None else "no fold (keys/values projected)"
        out[f"readme-64 tied depth 6 inference (batch {b}), {label}"] = {
            **res, "before": {"median_s": f + p}, "after": {"median_s": f}}
    set_fold(m, None)
    return out


def study_positions(args) -> dict:
    """Fourier features cached per shape/device/dtype, against recomputing them every forward."""
    m = readme(depth=2)
    x = images(1, 128)
    enc = m.position_encoding

    def uncached():
        enc._cache.clear()
        forward(m, x)()

    return {"128x128 depth 2 inference": timed({"before": uncached, "after": forward(m, x)}, args.repeats)}


@contextlib.contextmanager
def math_attention():
    """Swap SDPA in perceivers.layers.attention for an explicit softmax(QKᵀ)V (the peers' way)."""
    import perceivers.layers.attention as mod

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, scale=None, is_causal=False):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, torch.finfo(s.dtype).min)
        return torch.matmul(s.softmax(-1), v)

    real = mod.F
    mod.F = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    mod.F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        mod.F = real


def study_sdpa(args) -> dict:
    b = 2 if args.quick else 8
    m = readme()
    set_fold(m, False)
    x = images(b, 64)

    def before():
        with math_attention():
            forward(m, x)()

    res = {f"readme-64 depth 6 inference (batch {b}), no fold": timed({"before": before, "after": forward(m, x)},
                                                                      args.repeats)}
    set_fold(m, None)
    return res


def bf16(fn):
    """``fn`` under CPU bf16 autocast."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn()
    return run


def study_bf16(args) -> dict:
    b = 2 if args.quick else 8
    m = readme()
    x = images(b, 64)
    return {
        f"readme-64 depth 6 inference (batch {b})": timed({"before": forward(m, x), "after": bf16(forward(m, x))},
                                                          args.repeats),
        f"readme-64 depth 6 training step (batch {b})": timed(
            {"before": train_step(m, x), "after": bf16(train_step(m, x))}, args.repeats),
    }


IO_VARIANTS = {"before (whole context, projected)": (0, False), "fold only": (0, None),
               "stream only": (None, False), "after (fold + stream)": (None, None)}


def reduced_vision(chunk, fold):
    """The benchmark's reduced Fourier vision Perceiver IO (128×256 latents) with streaming / fold set."""
    torch.manual_seed(0)
    m = perceivers.create_model("vision-perceiver-fourier", num_latents=128, d_latents=256, num_blocks=2,
                                num_self_attends_per_block=2, chunk_size=chunk).eval()
    set_fold(m, fold)
    return m


def study_io(args) -> dict:
    """DeepMind family: folding the 261-wide cross-attention and streaming the image preprocessor."""
    out = {}
    for side in (512,) if args.quick else (512, 1024):
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
        models = {k: reduced_vision(*v) for k, v in IO_VARIANTS.items()}
        before, after = models["before (whole context, projected)"], models["after (fold + stream)"]
        case = f"reduced vision {side}x{side} inference"
        out[case] = timed({"before": forward(before, x), "fold only": forward(models["fold only"], x),
                           "stream only": forward(models["stream only"], x), "after": forward(after, x)},
                          args.repeats)
        del models
        row = {}
        for label, (chunk, fold) in IO_VARIANTS.items():
            spec = f"io,{side},{'auto' if chunk is None else chunk},{'auto' if fold is None else int(fold)}"
            row[label] = peak_in_child(spec)
        out[f"reduced vision {side}x{side} forward memory"] = row
    return out


def with_native(value: bool, fn, *, own: tuple[str, ...] = ()):
    """Run ``fn`` with the native grid kernel on or off (``PERCEIVERS_NATIVE``, read at every call) and the
    other native kernels (``attention``, ``geglu``: the activations, GEGLU, tanh GELU and softmax; each measured in
    its own study) off unless named in ``own``."""
    kernels = {"attention": native_attention, "geglu": native_activation}

    def run():
        os.environ["PERCEIVERS_NATIVE"] = "1" if value else "0"
        applies = {name: module.applies for name, module in kernels.items()}
        for name, module in kernels.items():
            if name not in own:
                module.applies = lambda *a, **k: False
        try:
            fn()
        finally:
            os.environ["PERCEIVERS_NATIVE"] = "0"  # the other studies measure without it (see main)
            for name, module in kernels.items():
                module.applies = applies[name]
    return run


def study_grid(args) -> dict:
    """The native grid kernel (position scores per axis) against the PyTorch path it replaces."""
    out = {}
    b = 2 if args.quick else 8
    m = readme()
    x = images(b, 64)
    out[f"readme-64 depth 6 inference (batch {b}), one chunk"] = timed(
        {"before": with_native(False, forward(m, x)), "after": with_native(True, forward(m, x))}, args.repeats)
    m2 = readme(depth=2)
    for side in (256, 512) if args.quick else (256, 512, 1024):
        x = images(1, side)
        out[f"{side}x{side} depth 2 inference, streamed"] = timed(
            {"before": with_native(False, forward(m2, x)), "after": with_native(True, forward(m2, x))}, args.repeats)
    m3 = readme(depth=6)
    x = images(2, 224)
    out["readme-224 depth 6 training step (batch 2)"] = timed(
        {"before": with_native(False, train_step(m3, x)), "after": with_native(True, train_step(m3, x))},
        args.repeats)
    vision = reduced_vision(None, None)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    out["reduced vision 224x224 training step (batch 2)"] = timed(
        {"before": with_native(False, train_step(vision, x)), "after": with_native(True, train_step(vision, x))},
        args.repeats)
    for side, batch in ((224, 2), (512, 1)):
        x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
        out[f"reduced vision {side}x{side} inference (batch {batch})"] = timed(
            {"before": with_native(False, forward(vision, x)), "after": with_native(True, forward(vision, x))},
            args.repeats)
    if not args.quick:
        for spec, case in (("1024,auto,auto", "1024x1024 depth 2 forward memory"),
                           ("io,1024,auto,auto", "reduced vision 1024x1024 forward memory")):
            out[case] = {"before": peak_in_child(spec), "after": peak_in_child(spec, native=True)}
    return out


def peak_in_child(spec: str, *, native: bool = False) -> dict:
    """Peak forward memory of one variant (``_memory_child`` spec), measured in a fresh process."""
    env = {**os.environ, "PERCEIVERS_NATIVE": "1" if native else "0"}
    proc = subprocess.run([sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True,
                          check=False, timeout=1800, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
    return json.loads(line[0][7:]) if line else {"error": proc.stderr[-300:]}


def _memory_child(spec: str) -> None:
    if spec.startswith("train,"):  # train,<batch>,<geglu 0|1>: the README 64² training step's peak
        _, batch, geglu = spec.split(",")
        step = with_native(True, train_step(readme(), images(int(batch), 64)),
                           own=("attention", "geglu") if geglu == "1" else ("attention",))
        step()  # the optimizer's state exists from here on
        meter = measure.PeakMemory(torch.device("cpu"))
        step()
        print("MEMORY " + json.dumps({"peak_bytes": meter.peak_bytes()}), flush=True)
        return
    family, side, chunk, fold = spec.split(",") if spec.startswith("io,") else ("readme", *spec.split(","))
    chunk = None if chunk == "auto" else int(chunk)
    fold = None if fold == "auto" else fold == "1"
    if family == "io":
        m = reduced_vision(chunk, fold)
        x = torch.randn(1, 3, int(side), int(side), generator=torch.Generator().manual_seed(1))
    else:
        m = readme(depth=2)
        m.chunk_size = chunk
        set_fold(m, fold)
        x = images(1, int(side))
    meter = measure.PeakMemory(torch.device("cpu"))
    forward(m, x)()
    print("MEMORY " + json.dumps({"peak_bytes": meter.peak_bytes()}), flush=True)


def study_memory(args) -> dict:
    """Peak forward memory, each variant in its own process."""
    out = {}
    sides = (256, 1024) if not args.quick else (256,)
    for side in sides:
        row = {}
        for label, spec in (("before (whole context, no fold)", f"{side},0,0"), ("fold only", f"{side},0,auto"),
                            ("after (fold + stream)", f"{side},auto,auto")):
            row[label] = peak_in_child(spec)
        out[f"{side}x{side} depth 2 forward"] = row
    return out


def with_onednn(dense: bool, attention: bool, fn):
    """Run ``fn`` with the dense layers and wide-head attention on oneDNN or not (MKL: ``F.linear`` / SDPA)."""
    def run():
        real = onednn_attention.applies
        if not attention:
            onednn_attention.applies = lambda *a, **k: False
        try:
            with use_onednn(dense):
                fn()
        finally:
            onednn_attention.applies = real
    return run


def study_onednn(args) -> dict:
    """float32 products on oneDNN instead of MKL: the dense layers, then wide-head attention as well."""
    out = {}
    torch.manual_seed(0)
    vision = perceivers.create_model("vision-perceiver-fourier").eval()  # official size, 48M parameters
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    m, xr = readme(), images(2 if args.quick else 8, 64)
    for case, model, inputs, modes in (("official vision 224x224 (batch 1)", vision, x, ("inference", "training step")),
                                       (f"readme-64 depth 6 (batch {xr.shape[0]})", m, xr, ("training step",))):
        for mode in modes:
            fn = forward(model, inputs) if mode == "inference" else train_step(model, inputs)
            out[f"{case} {mode}"] = timed({"before": with_onednn(False, False, fn),
                                           "dense layers only": with_onednn(True, False, fn),
                                           "after": with_onednn(True, True, fn)}, args.repeats)
    return out


def with_long_attention(attention: bool, long_sums: bool, fn):
    """Run ``fn`` with 64-wide float32 heads over long keys on oneDNN in chunks (else SDPA) and weight
    gradients with long sums on MKL (else oneDNN)."""
    from perceivers.layers import dense

    def run():
        keys, sums = onednn_attention._MIN_LONG_KEYS, dense._LONG_SUM
        onednn_attention._MIN_LONG_KEYS = keys if attention else 1 << 62
        dense._LONG_SUM = sums if long_sums else 1 << 62
        try:
            fn()
        finally:
            onednn_attention._MIN_LONG_KEYS, dense._LONG_SUM = keys, sums
    return run


def study_chunks(args) -> dict:
    """FlashPerceiver's benchmark model (depth 8, 256 latents, one 64-wide cross-attention head): its
    cross-attention over 4k / 16k tokens in chunks of keys on oneDNN instead of SDPA, and its key/value
    weight gradients (long sums) on MKL instead of oneDNN."""
    from perceivers.flash_perceiver import Perceiver as FlashPerceiver

    out = {}
    for tokens, batch in ((4096, 2 if args.quick else 8), (16384, 1 if args.quick else 4)):
        torch.manual_seed(0)
        model = FlashPerceiver(input_dim=128, depth=8, latent_dim=256, num_latents=256).eval()
        x = torch.randn(batch, tokens, 128, generator=torch.Generator().manual_seed(1))
        for mode in ("inference", "training step"):
            fn = forward(model, x) if mode == "inference" else train_step(model, x)
            out[f"FlashPerceiver {tokens // 1024}k tokens (batch {batch}) {mode}"] = timed(
                {"before": with_long_attention(False, False, fn), "attention only": with_long_attention(True, False, fn),
                 "after": with_long_attention(True, True, fn)}, args.repeats)
    return out


def with_bf16_grid(grid: bool, fn):
    """Run ``fn`` under bf16 autocast with images on the native grid kernel (``grid``; in float32) or,
    as before 2eca7c7, on the streamed bf16 products over the whole context."""
    from perceivers.layers import grid_attention

    native = with_native(True, bf16(fn))

    def run():
        serves = grid_attention.serves
        if not grid:
            grid_attention.serves = lambda *a, **k: serves(*a, **k) and not torch.is_autocast_enabled("cpu")
        try:
            native()
        finally:
            grid_attention.serves = serves
    return run


def study_bf16_grid(args) -> dict:
    """bf16 autocast: images with Fourier features on the native grid kernel (in float32) instead of bf16
    products over the whole context (the reduced DeepMind vision model, 224², batch 2)."""
    model = reduced_vision(None, None)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return {f"reduced vision 224x224 (batch 2) {mode}": timed(
        {"before": with_bf16_grid(False, fn), "after": with_bf16_grid(True, fn)}, args.repeats)
        for mode, fn in (("inference", forward(model, x)), ("training step", train_step(model, x)))}


def with_bf16_in_float32(value: bool, fn):
    """``fn`` under CPU bf16 autocast (the native kernels on) with perceivers' bf16 products in float32
    (``PERCEIVERS_BF16_AS_FLOAT32``, read at every call) or PyTorch's (emulated without bf16 arithmetic)."""
    native = with_native(True, bf16(fn), own=("attention", "geglu"))

    def run():
        os.environ["PERCEIVERS_BF16_AS_FLOAT32"] = "1" if value else "0"
        try:
            native()
        finally:
            os.environ.pop("PERCEIVERS_BF16_AS_FLOAT32", None)
    return run


def study_bf16_in_float32(args) -> dict:
    """bf16 autocast with perceivers' dense layers and attention computing in float32 (the default where the
    processor has no bf16 arithmetic) against PyTorch's bf16 products: the reduced language model and the
    DeepMind-layout IO."""
    import workloads

    cpu = torch.device("cpu")
    out = {}
    for name in ("language-reduced", "io-dm-2048x128"):
        wl = next(w for w in workloads.all_workloads() if w.name == name)
        built = wl.build("perceivers", cpu)
        batch = 2 if args.quick else wl.batch
        inputs = wl.inputs(batch, cpu)

        def call(built=built, inputs=inputs):
            return built.run(built.model, inputs)

        for mode, fn in (("inference", forward(built.model, call)), ("training step", train_step(built.model, call))):
            out[f"{name} (batch {batch}) {mode}"] = timed(
                {"before": with_bf16_in_float32(False, fn), "after": with_bf16_in_float32(True, fn)}, args.repeats)
    return out


def study_native_attention(args) -> dict:
    """float32 attention on the native fused kernel instead of SDPA's fused CPU kernel (narrow heads) or the
    per-head oneDNN products (wide heads, long keys): the reduced language model (32-wide heads), the README
    model (64-wide latent heads, folded 32-wide cross-attention) and FlashPerceiver over 4k tokens."""
    import workloads

    from perceivers.flash_perceiver import Perceiver as FlashPerceiver

    language = next(w for w in workloads.all_workloads() if w.name == "language-reduced")
    built = language.build("perceivers", torch.device("cpu"))
    tokens = language.inputs(language.batch, torch.device("cpu"))
    torch.manual_seed(0)
    flash = FlashPerceiver(input_dim=128, depth=8, latent_dim=256, num_latents=256).eval()
    b = 2 if args.quick else 8
    cases = (
        (f"reduced language model, 2048 bytes (batch {language.batch})", built.model,
         lambda: built.run(built.model, tokens)),
        (f"readme-64 depth 6 (batch {b})", readme(), images(b, 64)),
        (f"FlashPerceiver 4k tokens (batch {b})", flash,
         torch.randn(b, 4096, 128, generator=torch.Generator().manual_seed(1))),
    )
    out = {}
    for case, model, inputs in cases:
        for mode, fn in (("inference", forward(model, inputs)), ("training step", train_step(model, inputs))):
            out[f"{case} {mode}"] = timed({"before": with_native(True, fn), "after": with_native(True, fn, own=("attention",))},
                                          args.repeats)
    return out


def study_bf16_attention(args) -> dict:
    """bf16 autocast: attention on the native bf16 kernel (AVX512-BF16 dot products; in training heads with
    d_k + d_v < 128) instead of the blocked bf16 products: the reduced language model (32-wide heads) and
    the DeepMind-layout PerceiverIO over 2048 inputs."""
    import workloads

    found = []
    with_native(True, lambda: found.append(native_attention.available_bf16()))()  # the kernels are off between runs
    if not found[0]:
        print("  bf16_attention: this processor has no AVX512-BF16 (or no compiler): nothing to compare")
        return {}
    out = {}
    for name in ("language-reduced", "io-dm-2048x128"):
        work = next(w for w in workloads.all_workloads() if w.name == name)
        built = work.build("perceivers", torch.device("cpu"))
        inputs = work.inputs(work.batch, torch.device("cpu"))

        def call(built=built, inputs=inputs):
            return built.run(built.model, inputs)

        for mode, fn in (("inference", forward(built.model, call)), ("training step", train_step(built.model, call))):
            out[f"{name} (batch {work.batch}) {mode}"] = timed(
                {"before": with_native(True, bf16(fn)), "after": with_native(True, bf16(fn), own=("attention",))},
                args.repeats)
    return out


def study_native_geglu(args) -> dict:
    """GEGLU on the native kernel (one pass forward, one backward) instead of PyTorch's GELU, products and
    concatenation, in training steps (inference applies it in the products' epilogues): the README model and
    PerceiverIO over 2048 inputs, native attention on in both."""
    import workloads

    io = next(w for w in workloads.all_workloads() if w.name == "io-2048x128")
    built = io.build("perceivers", torch.device("cpu"))
    io_inputs = io.inputs(io.batch, torch.device("cpu"))
    b = 2 if args.quick else 8
    cases = ((f"readme-64 depth 6 (batch {b})", readme(), images(b, 64)),
             (f"PerceiverIO 2048 inputs, 128 queries (batch {io.batch})", built.model,
              lambda: built.run(built.model, io_inputs)))
    out = {f"{case} training step": timed(
        {"before": with_native(True, train_step(model, inputs), own=("attention",)),
         "after": with_native(True, train_step(model, inputs), own=("attention", "geglu"))}, args.repeats)
        for case, model, inputs in cases}
    out[f"readme-64 depth 6 (batch {b}) training step memory"] = {
        "before": peak_in_child(f"train,{b},0", native=True), "after": peak_in_child(f"train,{b},1", native=True)}
    return out


def _bf16_workloads(names: tuple[str, ...], args):
    """(case, model, call) for benchmark workloads built as ``run.py`` builds perceivers' side."""
    import workloads

    cpu = torch.device("cpu")
    for name in names:
        work = next(w for w in workloads.all_workloads() if w.name == name)
        built = work.build("perceivers", cpu)
        batch = min(work.batch, 2) if args.quick else work.batch
        inputs = work.inputs(batch, cpu)
        yield f"{name} (batch {batch})", built.model, lambda built=built, inputs=inputs: built.run(built.model, inputs)


def with_patches(patches: dict, fn):
    """``fn`` with ``module.name`` set to ``value`` for each ``(module, name): value`` while it runs."""
    def run():
        saved = {key: getattr(*key) for key in patches}
        for (module, name), value in patches.items():
            setattr(module, name, value)
        try:
            fn()
        finally:
            for (module, name), value in saved.items():
                setattr(module, name, value)
    return run


def study_bf16_geglu(args) -> dict:
    """bf16 autocast: GEGLU on the native kernel in bfloat16 (widened as read, float32 arithmetic, rounded once as
    written) instead of PyTorch's bfloat16 GELU, product and, in the backward, the halves' concatenation: the
    README model and PerceiverIO over 2048 inputs, the other native kernels on."""
    refuse_bf16 = {(native_activation, "applies"): lambda h, _real=native_activation.applies: (
        h.dtype != torch.bfloat16 and _real(h))}
    out = {}
    for case, model, call in _bf16_workloads(("readme-64-untied", "io-2048x128"), args):
        for mode, fn in (("inference", forward(model, call)), ("training step", train_step(model, call))):
            after = with_native(True, bf16(fn), own=("attention", "geglu"))
            out[f"{case} {mode}"] = timed({"before": with_patches(refuse_bf16, after), "after": after}, args.repeats)
    return out


def study_bf16_amx(args) -> dict:
    """bf16 autocast on a processor with AMX: oneDNN's bfloat16 paths (blocked attention in training, activations
    in the products' epilogues, SDPA's fused forward for equal-width heads) instead of the native AVX512-BF16
    attention kernel where it applies and SDPA elsewhere, as before (every native kernel on in both)."""
    from perceivers import kernels
    from perceivers.layers import dense

    if not kernels.has_amx():
        print("  bf16_amx: this processor has no AMX: nothing to compare")
        return {}
    before = {(kernels, "has_amx"): lambda: False, (dense, "onednn_bf16_enabled"): lambda: False}
    out = {}
    for case, model, call in _bf16_workloads(("readme-64-untied", "io-2048x128", "io-dm-2048x128", "language-reduced"),
                                             args):
        for mode, fn in (("inference", forward(model, call)), ("training step", train_step(model, call))):
            after = with_native(True, bf16(fn), own=("attention", "geglu"))
            out[f"{case} {mode}"] = timed({"before": with_patches(before, after), "after": after}, args.repeats)
    return out


def study_gelu_tanh(args) -> dict:
    """DeepMind's tanh GELU on the native kernel (through the logistic function, float32 and bfloat16) instead of
    PyTorch's ``gelu(approximate="tanh")``: the DeepMind-layout PerceiverIO and the reduced language and vision
    models, inference and training steps, float32 and under bf16 autocast, the other native kernels on."""
    return _both_precisions(("io-dm-2048x128", "language-reduced", "vision-fourier-reduced"), _refusing("gelu_tanh"),
                            args)


def _refusing(activation: str) -> dict:
    """A patch under which ``native_activation.applies`` refuses ``activation`` (the other kernels as they are)."""
    return {(native_activation, "applies"): lambda h, kind="geglu", _real=native_activation.applies: (
        kind != activation and _real(h, kind))}


def _both_precisions(names: tuple[str, ...], before: dict, args, skip=lambda case, precision: False) -> dict:
    """Inference and training steps of the workloads ``names`` in float32 and under bf16 autocast (except where
    ``skip(case, precision)``), with the ``before`` patches and without (the native attention and activation kernels
    on in both)."""
    out = {}
    for case, model, call in _bf16_workloads(names, args):
        for mode, fn in (("inference", forward(model, call)), ("training step", train_step(model, call))):
            for precision, run in (("fp32", fn), ("bf16", bf16(fn))):
                if skip(case, precision):
                    continue
                after = with_native(True, run, own=("attention", "geglu"))
                out[f"{case} {precision} {mode}"] = timed({"before": with_patches(before, after), "after": after},
                                                          args.repeats)
    return out


def study_softmax(args) -> dict:
    """The native softmax kernel (float32 exponentials and sums, bfloat16 rounded once) instead of PyTorch's, where
    the attention writes its softmax out: the reduced language model (float32: unequal key and value widths; bf16:
    the blocked products or, on AMX in training, autograd) and the DeepMind-layout PerceiverIO under bf16 autocast,
    the other native kernels on."""
    # the DeepMind-layout IO's equal-width float32 heads take the fused kernels, which have their own softmax
    return _both_precisions(("language-reduced", "io-dm-2048x128"), _refusing("softmax"), args,
                            skip=lambda case, precision: precision == "fp32" and case.startswith("io-dm"))


def study_bf16_amx_written_out(args) -> dict:
    """bf16 autocast training on a processor with AMX: heads of at most 2^23 scores attended as their products and
    softmax, which autograd differentiates (``attention._written_out_on_amx``), instead of the blocked oneDNN
    products' own forward and backward (every native kernel on in both)."""
    from perceivers import kernels
    from perceivers.layers import attention

    if not kernels.has_amx():
        print("  bf16_amx_written_out: this processor has no AMX: nothing to compare")
        return {}
    before = {(attention, "_written_out_on_amx"): lambda *args: False}
    out = {}
    for case, model, call in _bf16_workloads(("readme-64-untied", "io-2048x128", "io-dm-2048x128", "language-reduced",
                                              "flash-perceiver-1k"), args):
        after = with_native(True, bf16(train_step(model, call)), own=("attention", "geglu"))
        out[f"{case} training step"] = timed({"before": with_patches(before, after), "after": after}, args.repeats)
    return out


def study_onednn_amx(args) -> dict:
    """float32 on a processor with AMX: a latent array's products at batch 1 (at most 512 rows, 2^26 multiply-adds)
    on oneDNN (``dense._onednn_on_amx``: in inference with the activations in their epilogues, in training the
    forward product only) instead of MKL."""
    from perceivers import kernels
    from perceivers.layers import dense

    if not kernels.has_amx():
        print("  onednn_amx: this processor has no AMX: nothing to compare")
        return {}
    before = {(dense, "_onednn_on_amx"): lambda *args: False}
    out = {}
    for case, model, call in _bf16_workloads(("sweep-perceiver-32", "sweep-perceiver-256", "sweep-perceiver-1024",
                                              "vision-fourier-reduced", "sweep-io-256", "language-official"), args):
        modes = [("inference", forward(model, call))]
        if case.startswith("language-official"):
            modes.append(("training step", train_step(model, call)))
        for mode, fn in modes:
            after = with_native(True, fn, own=("attention", "geglu"))
            out[f"{case} {mode}"] = timed({"before": with_patches(before, after), "after": after}, args.repeats)
    return out


def study_bias_in_activation(args) -> dict:
    """float32: the first feed-forward product's bias added by the native GEGLU / tanh-GELU kernel that follows it
    (``dense._bias_in_activation``) instead of by the product (PyTorch's ``addmm`` broadcasts it into its output
    first): the README model, PerceiverIO over 2048 inputs and the reduced language and vision models."""
    from perceivers.layers import dense

    before = {(dense, "_bias_in_activation"): lambda *args: False}
    out = {}
    for case, model, call in _bf16_workloads(("readme-64-tied", "io-2048x128", "language-reduced",
                                              "vision-fourier-reduced"), args):
        for mode, fn in (("inference", forward(model, call)), ("training step", train_step(model, call))):
            after = with_native(True, fn, own=("attention", "geglu"))
            out[f"{case} {mode}"] = timed({"before": with_patches(before, after), "after": after}, args.repeats)
    return out


def study_native_glu(args) -> dict:
    """GLU (FlashPerceiver's gated MLPs) on the native kernel, with fc1's float32 bias added there, instead of
    PyTorch's ``glu`` after a biased product: FlashPerceiver's benchmark model at 1k and 4k tokens, inference and
    training steps, float32 and under bf16 autocast (every other native kernel on in both)."""
    from perceivers.layers import dense

    before = {**_refusing("glu"), (dense, "_bias_in_activation"): lambda *args: False}
    return _both_precisions(("flash-perceiver-1k", "flash-perceiver-4k"), before, args)


STUDIES = {"fold": study_fold, "stream": study_stream, "tied_kv": study_tied_kv, "positions": study_positions,
           "sdpa": study_sdpa, "bf16": study_bf16, "memory": study_memory, "io": study_io, "grid": study_grid,
           "onednn": study_onednn, "chunks": study_chunks, "bf16_grid": study_bf16_grid,
           "native_attention": study_native_attention, "native_geglu": study_native_geglu,
           "bf16_attention": study_bf16_attention, "bf16_in_float32": study_bf16_in_float32,
           "bf16_geglu": study_bf16_geglu, "bf16_amx": study_bf16_amx, "gelu_tanh": study_gelu_tanh,
           "softmax": study_softmax, "bf16_amx_written_out": study_bf16_amx_written_out,
           "onednn_amx": study_onednn_amx, "bias_in_activation": study_bias_in_activation,
           "native_glu": study_native_glu}


def markdown(results: dict) -> str:
    lines = ["# perceivers optimisations: before / after", "",
             (f"Machine: {results['machine'].get('cpu')} ({results['machine'].get('cpu_count')} cores), torch "
             f"{results['machine'].get('torch')}, load average at start {results['machine'].get('loadavg_at_start')}."
             " Times are medians of interleaved repeats (same process, same weights)."), "",
             "| optimisation | case | before | after | after / before |", "|---|---|---|---|---|"]
    for study, cases in results["studies"].items():
        for case, res in cases.items():
            if study == "memory" or case.endswith("memory"):  # peak bytes per variant
                vals = {k: v.get("peak_bytes") for k, v in res.items()}
                first, last = next(iter(vals.values())), list(vals.values())[-1]
                desc = ", ".join(f"{k}: {v / 2**20:.1f} MiB" if v else f"{k}: –" for k, v in vals.items())
                ratio = f"{last / first:.3f}" if first and last else "–"
                lines.append(f"| {study} | {case} | {desc} | | {ratio} |")
                continue
            before, after = res["before"]["median_s"], res["after"]["median_s"]
            extra = "".join(f" ({k}: {v['median_s']:.3f} s)" for k, v in res.items() if k not in ("before", "after"))
            lines.append(f"| {study} | {case} | {before:.3f} s | {after:.3f} s{extra} | {after / before:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", default=None, choices=list(STUDIES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--tag", default=None, help="results file name after 'ablations-' (default: the machine's)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    # Each study isolates one optimisation: the native grid kernel (which takes over the streamed and
    # folded image cross-attention it measures) stays off except in its own study.
    os.environ["PERCEIVERS_NATIVE"] = "0"
    desc = measure.machine_description(torch.device("cpu"))
    path = Path(args.out) / f"ablations-{args.tag or machine_tag(torch.device('cpu'), desc)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {"studies": {}}
    results["machine"] = desc
    for name in args.only or list(STUDIES):
        t0 = time.perf_counter()
        results["studies"][name] = STUDIES[name](args)
        print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(results['studies'][name], indent=1)}",
              flush=True)
        path.write_text(json.dumps(results, indent=1))
        path.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
