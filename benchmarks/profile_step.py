"""Profile one benchmark workload's training step (or forward): where its time goes, operator by operator.

    python benchmarks/profile_step.py vision-fourier-official --device cuda --batch 32 --compile
    python benchmarks/profile_step.py readme-64-untied --mode infer --impl perceiver-pytorch

Builds the workload as ``run.py`` does (same model, inputs, AdamW step and autocast), warms it up, times
``--steps`` steps (median, and FLOP/s with model FLOP utilisation on a GPU whose peak is known), then records
``--profile-steps`` steps with ``torch.profiler`` and prints the operators by self device time (CPU time on
the CPU). ``--out FILE`` also writes that table and the timings to a file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure
import run
import workloads as W


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", help="a workload name (benchmarks/run.py --list)")
    p.add_argument("--impl", default=W.OURS, help=f"implementation (default {W.OURS})")
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the workload's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (+ backward), as run.py does")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps")
    p.add_argument("--rows", type=int, default=25, help="operators listed")
    p.add_argument("--out", default=None, help="also write the report to this file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = run.check_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    by_name = {w.name: w for w in W.all_workloads()}
    if args.workload not in by_name:
        run.fail(f"unknown workload {args.workload!r}; expected one of: {', '.join(by_name)}")
    wl = by_name[args.workload]
    if args.impl not in wl.impls:
        run.fail(f"--impl {args.impl!r}: {wl.name} runs {', '.join(wl.impls)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    batch = args.batch or wl.batch
    built = wl.build(args.impl, device)
    inputs = wl.inputs(batch, device)
    fn = (run.make_step(built, inputs, device, precision, compile=args.compile) if args.mode == "train"
          else run.make_forward(built, inputs, device, precision, compile=args.compile))
    for _ in range(args.warmup):
        fn()
    measure.synchronize(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        fn()
        measure.synchronize(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    eager = (run.make_step(built, inputs, device, precision) if args.mode == "train"
             else run.make_forward(built, inputs, device, precision))
    flops = measure.count_flops(eager)  # counted eagerly: the same products as the compiled step
    lines = [(f"{wl.name} ({wl.description}), {args.impl}, {args.mode}, batch {batch}, {precision}"
             f"{', compiled' if args.compile else ''}, {device}"),
             (f"median {median * 1e3:.2f} ms, best {min(times) * 1e3:.2f} ms over {args.steps} steps; "
             f"{flops / 1e9:.1f} GFLOP per step → {flops / median / 1e9:.1f} GFLOP/s")]
    desc = measure.machine_description(device)
    peak = measure.gpu_peak_flop_per_s(desc.get("gpu", ""), precision) if device.type == "cuda" else None
    if peak:
        lines[-1] += f", model FLOP utilisation {flops / median / peak:.1%} of {desc['gpu']}'s {peak / 1e12:.0f} TFLOP/s"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            fn()
        measure.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
