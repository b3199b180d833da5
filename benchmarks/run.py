#!/usr/bin/env python
"""perceivers against its peers, side by side, in one run.

    python benchmarks/run.py                 # every workload (about an hour on a 2-core CPU)
    python benchmarks/run.py --quick         # a few workloads, small batches, few repeats
    python benchmarks/run.py --only sweep    # workloads whose name or tag contains "sweep"
    python benchmarks/run.py --device cuda   # bf16 autocast by default on CUDA
    python benchmarks/run.py --compile       # every implementation under torch.compile
    python benchmarks/run.py --compile --freezing --no-train   # compiled inference with Inductor's freezing

For every workload the implementations are timed interleaved (each round in a fresh order) in one process, so
their ratios hold on a loaded machine; peak memory is measured for each implementation and mode
in a fresh subprocess; FLOPs come from ``torch.utils.flop_counter``; the machine's dense matmul
rate is measured in the same run. Results go to ``benchmarks/results/<machine>[-bf16][-compile]...json`` and
``.md`` (merged with earlier runs of other workloads on the same machine and settings; each row names its run),
both replaced atomically. A results file that is not valid JSON is refused, never overwritten. A workload that
fails keeps its earlier good entry (reported on stderr) and the run exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import measure
import report
import torch
import workloads as W

from perceivers import kernels

MATMUL = "_matmul"


def fail(message: str) -> NoReturn:
    """End the run with a one-line error, as argparse does (exit status 2)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_device(text: str) -> torch.device:
    """``--device``: cpu, or cuda[:N] on a machine with that CUDA device; anything else ends the run."""
    try:
        device = torch.device(text)
    except RuntimeError:
        fail(f"--device: expected cpu or cuda[:N], got {text!r}")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device: expected cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {text}: expected a CUDA device, got none (torch {torch.__version__}, "
                 f"CUDA build {torch.version.cuda})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(f"--device {text}: expected an index below {torch.cuda.device_count()} (the CUDA devices here), "
                 f"got {device.index}")
    return device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick subset: small batches, 2 repeats")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--only", nargs="*", default=None, help="workload names or tags (substring match)")
    p.add_argument("--skip", nargs="*", default=["large"], help="tags/names to skip (default: large); "
                   "pass --skip with nothing to run everything")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="fp32 (CPU default) or bf16 autocast (CUDA default)")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                   help="AdamW implementation of the training step, the same for every implementation (default: "
                        "fused, one pass per parameter; foreach is PyTorch's default)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed host memory in the process (glibc mallopt, perceivers.allocator) for every "
                        "implementation alike: large activations stop page-faulting on every step")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every implementation alike: the training step's forward + backward (AdamW "
                        "stays eager) and the inference forward; compilation happens before the timing")
    p.add_argument("--freezing", action="store_true",
                   help="with --compile: Inductor's freezing for every implementation alike (torch._inductor.config"
                        ".freezing: weights folded in as constants, fp32 CPU products on pre-packed weights); it "
                        "changes inference graphs only (no autograd), so use it with --no-train")
    p.add_argument("--batch-scale", type=int, default=1,
                   help="multiply every workload's batch (the defaults suit a 2-core CPU; a GPU needs larger batches "
                   "to fill it)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    p.add_argument("--min-time", type=float, default=10.0,
                   help="keep timing rounds (past --repeats, up to 30) until this many seconds per workload and mode")
    p.add_argument("--budget", type=float, default=90.0, help="seconds of timing per workload and mode")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--peer-mem-limit", type=float, default=8.0,
                   help="GiB: skip a peer whose estimated forward memory exceeds this")
    p.add_argument("--out", default=str(HERE / "results"), help="results folder")
    p.add_argument("--tag", default=None, help="results file name (default: derived from the machine and the settings "
                   "that change the figures: precision, --compile, --freezing, --keep-freed-memory, --optimizer)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--memory-case", nargs=4, metavar=("WORKLOAD", "IMPL", "MODE", "BATCH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(built: W.Built, inputs: tuple, device: torch.device, precision: str, optimizer: str = "fused",
              compile: bool = False):
    model = built.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **{optimizer: True})

    def forward_backward() -> None:
        with autocast(device, precision):
            out = built.run(model, inputs)
        loss = out.float().pow(2).mean()
        loss.backward()

    run = torch.compile(forward_backward) if compile else forward_backward

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        run()
        opt.step()

    return step


def make_forward(built: W.Built, inputs: tuple, device: torch.device, precision: str, compile: bool = False):
    model = built.model
    run = torch.compile(built.run) if compile else built.run

    def forward() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            run(model, inputs)

    return forward


def compiled(cases: dict, device: torch.device) -> dict:
    """Compile ``cases`` (their first calls) before timing; a case that fails to compile is reported and dropped."""
    ready = {}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        try:
            fn()
            fn()  # a recompilation for the second call's state (e.g. gradients now allocated) happens here
        except Exception as exc:  # noqa: BLE001 - one peer failing under torch.compile must not end the run
            print(f"  {name}: torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        measure.synchronize(device)
        print(f"  {name}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        ready[name] = fn
    return ready


# ------------------------------------------------------------------------------------------ memory


def memory_case(args: argparse.Namespace) -> None:
    """Child process: build one implementation, measure the peak of two forwards or two steps."""
    name, impl, mode, batch = args.memory_case
    device = torch.device(args.device)
    wl = {w.name: w for w in W.all_workloads()}[name]
    built = wl.build(impl, device)
    inputs = wl.inputs(int(batch), device)
    gc.collect()
    meter = measure.PeakMemory(device)
    fn = make_forward(built, inputs, device, args.precision, args.compile) if mode == "infer" else \
        make_step(built, inputs, device, args.precision, args.optimizer, args.compile)
    if args.compile:  # the peak of running, not of compiling
        fn()
        gc.collect()
        meter = measure.PeakMemory(device)
    t0 = time.perf_counter()
    for _ in range(1 if wl.heavy else 2):
        fn()
    print("MEMORY " + json.dumps({"peak_bytes": meter.peak_bytes(), "method": meter.method,
                                  "seconds": time.perf_counter() - t0}), flush=True)


def memory_command(args, wl: W.Workload, impl: str, mode: str, batch: int) -> list[str]:
    return [sys.executable, str(HERE / "run.py"), "--device", args.device, "--precision", args.precision,
            "--optimizer", args.optimizer, *(["--keep-freed-memory"] if args.keep_freed_memory else []),
            *(["--compile"] if args.compile else []), *(["--freezing"] if args.freezing else []),
            *(["--threads", str(args.threads)] if args.threads else []),
            "--memory-case", wl.name, impl, mode, str(batch)]


def measure_memory(args, wl: W.Workload, impl: str, mode: str, batch: int, timeout: float = 1800) -> dict:
    """Peak memory of one case in a child process; the child is killed if this one is interrupted."""
    proc = subprocess.Popen(memory_command(args, wl, impl, mode, batch), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    finally:  # a timeout, Ctrl-C or SIGTERM (SystemExit, see main) must not leave the child running
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for line in stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[7:])
    tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}


# ------------------------------------------------------------------------------------------ one workload


def effective_batch(args, wl: W.Workload) -> int:
    return min(wl.batch, 2) if args.quick else wl.batch * args.batch_scale


def run_workload(args, wl: W.Workload, device: torch.device, rates: dict) -> dict:
    batch = effective_batch(args, wl)
    repeats = 1 if wl.heavy else (args.repeats or (2 if args.quick else 3))
    min_time = 0.0 if wl.heavy or args.quick else args.min_time
    warmup = 0 if wl.heavy else 1
    entry: dict = {"workload": wl.name, "family": wl.family, "description": wl.description, "batch": batch,
                   "elements": wl.elements, "precision": args.precision, "impls": {}}
    print(f"\n=== {wl.name}: {wl.description} (batch {batch})", flush=True)
    limit = args.peer_mem_limit * W.GiB
    impls = []
    for impl in wl.impls:
        why = W.peer_unavailable(impl, device)
        if why:  # an optional peer that is not installed here
            entry["impls"][impl] = {"skipped": why}
            print(f"  {impl}: skipped ({why})")
            continue
        est = wl.estimate(impl, batch) if (wl.estimate and device.type == "cpu") else 0.0
        if impl != W.OURS and est > limit:
            entry["impls"][impl] = {"skipped": f"estimated forward memory {W.human_bytes(est)} > "
                                               f"--peer-mem-limit {args.peer_mem_limit:g} GiB"}
            print(f"  {impl}: skipped ({entry['impls'][impl]['skipped']})")
            continue
        impls.append(impl)
    built = {}
    for impl in impls:
        t0 = time.perf_counter()
        try:
            built[impl] = wl.build(impl, device)
        except W.Unavailable as exc:  # e.g. perceivers' model of a workload built from a peer that is not installed
            entry["impls"][impl] = {"skipped": str(exc)}
            print(f"  {impl}: skipped ({exc})")
            continue
        entry["impls"][impl] = {"params": W.parameter_count(built[impl].model), "note": built[impl].note,
                                "build_s": round(time.perf_counter() - t0, 2)}
    impls = list(built)
    inputs = wl.inputs(batch, device)

    # Same configuration: parameter counts above, outputs compared here (batch 1).
    if wl.check and len(built) > 1:
        one = wl.inputs(1, device)
        outs = {}
        with torch.inference_mode():
            for impl, b in built.items():
                b.model.eval()
                outs[impl] = b.run(b.model, one).float()
        ref = outs.get(W.OURS)
        for impl, o in outs.items():
            if impl != W.OURS and ref is not None:
                entry["impls"][impl]["max_abs_diff_vs_perceivers"] = float((o - ref).abs().max())
        del outs, ref

    # Inference
    fwd = {impl: make_forward(b, inputs, device, args.precision, args.compile) for impl, b in built.items()}
    if args.compile:
        fwd = compiled(fwd, device)
    products = report.fp32_products(rates)
    mm_fn, mm_flops = measure.matmul_case(device, torch.bfloat16 if args.precision == "bf16" else torch.float32,
                                          product=max(products, key=products.get) if products else None)
    times = measure.alternate({**fwd, MATMUL: mm_fn}, device, repeats=repeats, warmup=warmup, budget_s=args.budget,
                                  min_time_s=min_time)
    rate = mm_flops / measure.summarize(times.pop(MATMUL))["median_s"]
    entry["matmul_flop_per_s"] = rate
    print(f"  matmul rate (interleaved) {rate / 1e9:.1f} GFLOP/s", flush=True)
    for impl, t in times.items():
        s = measure.summarize(t)
        entry["impls"][impl]["infer"] = {**s, "samples_per_s": batch / s["median_s"]}
        print(f"  infer {impl:18s} {s['median_s']:.3f} s/batch  ({batch / s['median_s']:.2f} samples/s)", flush=True)
    if not args.no_flops and not wl.heavy:
        for impl, b in built.items():
            # counted with autograd on: under no_grad FlopCounterMode's module tracker fails on a module input that
            # is a view of a parameter (transformers' latents; perceivers passes those detached, layers/broadcast.py)
            fn = lambda b=b, inputs=inputs: b.run(b.model.eval(), inputs)
            entry["impls"][impl]["infer"]["flops_per_sample"] = measure.count_flops(fn) / batch

    # Training step
    if wl.train and not args.no_train:
        steps = {impl: make_step(b, inputs, device, args.precision, args.optimizer, args.compile)
                 for impl, b in built.items()}
        if args.compile:
            steps = compiled(steps, device)
        times = measure.alternate({**steps, MATMUL: mm_fn}, device, repeats=repeats, warmup=warmup,
                                  budget_s=args.budget, min_time_s=min_time)
        rate = mm_flops / measure.summarize(times.pop(MATMUL))["median_s"]
        entry["matmul_flop_per_s_train"] = rate
        for impl, t in times.items():
            s = measure.summarize(t)
            entry["impls"][impl]["train"] = s
            print(f"  train {impl:18s} {s['median_s']:.3f} s/step", flush=True)
        if not args.no_flops:
            for impl in steps:
                # forward + backward, counted eagerly (the same work compiled); AdamW's elementwise work is not
                flops = measure.count_flops(make_step(built[impl], inputs, device, args.precision, args.optimizer))
                tr = entry["impls"][impl]["train"]
                tr["flops_per_step"] = flops
                tr["flop_per_s"] = flops / tr["median_s"]
                tr["flop_per_s_best"] = flops / tr["min_s"]
                tr["fraction_of_matmul"] = tr["flop_per_s"] / entry["matmul_flop_per_s_train"]
                if rates.get("peak_flop_per_s"):
                    tr["mfu"] = tr["flop_per_s"] / rates["peak_flop_per_s"]
        del steps
    for impl in list(built):
        inf = entry["impls"][impl].get("infer")
        if inf and "flops_per_sample" in inf:
            inf["flop_per_s"] = inf["flops_per_sample"] * inf["samples_per_s"]
            inf["fraction_of_matmul"] = inf["flop_per_s"] / entry["matmul_flop_per_s"]
            if rates.get("peak_flop_per_s"):
                inf["mfu"] = inf["flop_per_s"] / rates["peak_flop_per_s"]
    del fwd, built, inputs
    gc.collect()

    if not args.no_memory:
        modes = ["infer"] + (["train"] if wl.train and not args.no_train else [])
        for impl in impls:
            for mode in modes:
                mem = measure_memory(args, wl, impl, mode, batch)
                entry["impls"][impl].setdefault(mode, {})["peak_memory"] = mem
                shown = W.human_bytes(mem["peak_bytes"]) if "peak_bytes" in mem else mem.get("error")
                print(f"  peak  {impl:18s} {mode}: {shown}", flush=True)
    report.add_ratios(entry)
    return entry


def select(workloads: list[W.Workload], args) -> list[W.Workload]:
    def hit(w: W.Workload, pats) -> bool:
        return any(p in w.name or p in w.tags for p in pats)

    out = workloads
    if args.quick and not args.only:
        out = [w for w in out if "quick" in w.tags]
    if args.only:
        out = [w for w in out if hit(w, args.only)]
    if args.skip:
        out = [w for w in out if not hit(w, args.skip) or (args.only and w.name in args.only)]
    return out


def machine_tag(device: torch.device, desc: dict) -> str:
    if device.type == "cuda":
        base = "cuda-" + desc.get("gpu", "gpu")
    else:
        base = f"cpu-{desc['cpu_count']}core-" + desc["cpu"]
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def default_tag(device: torch.device, desc: dict, args) -> str:
    """The results file of a run: the machine, then each setting that changes the figures and is not the default
    (a bf16 run does not merge into the fp32 file)."""
    return machine_tag(device, desc) + "".join(
        suffix for suffix, on in ((f"-{args.precision}", args.precision != "fp32"), ("-compile", args.compile),
                                  ("-freezing", args.freezing),
                                  ("-keep-freed", args.keep_freed_memory),
                                  (f"-batch-x{args.batch_scale}", args.batch_scale != 1),
                                  (f"-{args.optimizer}", args.optimizer != "fused")) if on)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through measure_memory's cleanup of its child


def record(results: dict, entry: dict, args) -> str | None:
    """Put ``entry`` into ``results``; returns why it was not recorded as it came (or None).

    A failed workload does not replace an earlier good entry (that one stays; the failure is reported on stderr);
    with ``--no-memory`` the earlier entry's peak memory is carried over where batch and settings match.
    """
    old = results["workloads"].get(entry["workload"])
    if entry.get("error") and old and not old.get("error"):
        return (f"{entry['workload']} failed ({entry['error']}); kept its earlier entry "
                f"(run started {(old.get('run') or {}).get('started')})")
    note = None
    if args.no_memory and old:
        differ = report.carry_peak_memory(entry, old)
        if differ:
            note = f"{entry['workload']}: earlier peak memory not carried over ({', '.join(differ)})"
    results["workloads"][entry["workload"]] = entry
    return note


def main(argv=None) -> None:
    args = parse_args(argv)
    device = check_device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.batch_scale < 1:
        fail(f"--batch-scale: expected a whole number of at least 1, got {args.batch_scale}")
    if args.freezing:
        if not args.compile:
            fail("--freezing: applies to compiled models; add --compile")
        from torch._inductor import (
            config as inductor_config,  # not `import torch._inductor.config`: a local torch
        )

        inductor_config.freezing = True
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from perceivers.allocator import keep_freed_memory

        if not keep_freed_memory():
            print("--keep-freed-memory: not applied (needs Linux with glibc)", flush=True)
    if args.memory_case:
        memory_case(args)
        return
    if args.precision == "bf16" and args.device == "cpu" and kernels.emulates_bf16():
        print("--precision bf16: this CPU has no bfloat16 arithmetic (no AVX512-BF16 or AMX): the peers' bfloat16 "
              "products are emulated (the matmul column is that emulated rate), perceivers computes its own in "
              "float32 unless PERCEIVERS_BF16_AS_FLOAT32=0", flush=True)
    if args.list:
        for w in W.all_workloads():
            print(f"{w.name:26s} [{', '.join(sorted(w.tags))}] {w.description}")
        return
    chosen = select(W.all_workloads(), args)
    if not chosen:
        fail(f"no workload matches --only {' '.join(args.only or []) or '(none: --quick)'} after --skip "
             f"{' '.join(args.skip or []) or '(nothing)'}; expected at least one (see --list)")
    with contextlib.suppress(ValueError):  # not the main thread: no handler, SIGTERM ends the run as before
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    desc = measure.machine_description(device)
    tag = args.tag or default_tag(device, desc, args)
    out_dir = Path(args.out)
    path_json = out_dir / f"{tag}.json"
    try:
        results = report.load(path_json)
    except report.CorruptResults as exc:
        fail(str(exc))
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"machine: {desc}")
    products = measure.matmul_rates(device, torch.float32)
    rates = {"matmul_flop_per_s": max(products.values()),
             **{f"product_{name}_flop_per_s": rate for name, rate in products.items()}}
    if args.precision == "bf16" or device.type == "cuda":
        rates["matmul_bf16_flop_per_s"] = measure.matmul_rate(device, torch.bfloat16)
    peak = measure.gpu_peak_flop_per_s(desc.get("gpu", ""), args.precision) if device.type == "cuda" else None
    if peak:
        rates["peak_flop_per_s"] = peak  # the data sheet's, for model FLOP utilisation
    print("matmul rate: " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in rates.items()), flush=True)
    run_info = {"machine": desc, "rates": rates, "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "device": str(device), "precision": args.precision, "optimizer": args.optimizer,
                "keep_freed_memory": args.keep_freed_memory, "compile": args.compile, "freezing": args.freezing}
    failed = []
    for wl in chosen:
        try:
            entry = run_workload(args, wl, device, rates)
        except Exception as exc:  # noqa: BLE001 - one failing workload (e.g. out of memory) must not end the run
            print(f"  FAILED: {type(exc).__name__}: {exc}", flush=True)
            entry = {"workload": wl.name, "family": wl.family, "description": wl.description,
                     "batch": effective_batch(args, wl), "elements": wl.elements, "precision": args.precision,
                     "impls": {}, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            failed.append(wl.name)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        entry["run"] = run_info
        note = record(results, entry, args)
        if note:
            print(f"  {note}", file=sys.stderr, flush=True)
        results["machine"], results["rates"] = desc, rates  # the latest run; each entry keeps its own in "run"
        report.save(results, path_json, out_dir / f"{tag}.md")
    report.save(results, path_json, out_dir / f"{tag}.md")
    print(f"\nwrote {path_json} and {path_json.with_suffix('.md')}")
    if failed:
        print(f"{len(failed)} workload(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
