#!/usr/bin/env python
"""Exported programs against eager mode: time and peak memory, each case in its own process.

    python benchmarks/exported.py                          # every case and format
    python benchmarks/exported.py --only readme-1024 --formats eager pt2-native
    python benchmarks/exported.py --quick                  # small sizes, 2 repeats

Each program is written as ``perceivers export`` writes it (``export_program``: the batch and the sizes
dynamic, traced at batch 2 and the case's size): ``pt2`` inside ``fused_export()`` (the default ``.pt2``),
``pt2-native`` inside ``native_export()`` (``--native``), ``onnx`` inside ``onnx_export()`` and run in
onnxruntime. A subprocess writes it (its export time is reported); a fresh one loads it, runs it once (peak
memory above the resident set after loading, :class:`measure.PeakMemory`), times ``--repeats`` calls (best and
median) and compares the output with eager mode's. ``eager`` is the model itself, measured the same way.
Results: ``benchmarks/results/exported-<machine>.json`` and ``.md`` (replaced atomically).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure
import torch
import workloads as W
from torch import Tensor, nn

FORMATS = ("eager", "pt2", "pt2-native", "onnx")
SIZES = {"readme": (256, 1024), "vision-io": (256, 1024), "io-queries": (65536, 262144)}
QUICK = {"readme": (64,), "vision-io": (64,), "io-queries": (4096,)}


class _Queries(nn.Module):
    """PerceiverIO taking ``{"data": [B, N, 32], "queries": [B, M, 64]}``: a dynamic query count."""

    def __init__(self) -> None:
        super().__init__()
        import perceivers

        self.io = perceivers.PerceiverIO(dim=32, queries_dim=64, logits_dim=16, depth=1, num_latents=256,
                                         latent_dim=256, latent_heads=8, latent_dim_head=32, cross_dim_head=64)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.io(inputs["data"], queries=inputs["queries"])


def build(case: str):
    """``case`` ("readme-1024", "vision-io-256", "io-queries-65536") → (model, ``ExportInputs`` at batch 1)."""
    import perceivers
    from perceivers.commands.export import ExportInputs, example_inputs

    family, size = case.rsplit("-", 1)
    size = int(size)
    torch.manual_seed(0)
    if family == "readme":  # perceiver-pytorch's README Perceiver, depth 2, untied (the benchmark's sweep)
        model = perceivers.Perceiver(**dict(W.README_PERCEIVER, depth=2)).eval()
        return model, example_inputs(model, (1, size, size, 3))
    if family == "vision-io":  # the Fourier vision Perceiver IO, reduced (the benchmark's sweep-io)
        reduced = {k: v for k, v in W.VISION_REDUCED.items() if k != "d_model"}
        model = perceivers.create_model("vision-perceiver-fourier", **reduced).eval()
        return model, example_inputs(model, (1, 3, size, size))
    if family == "io-queries":  # 256 × 256 latents decoding a dynamic number of 16-logit queries
        gen = torch.Generator().manual_seed(1)
        value = {"data": torch.randn(1, 64, 32, generator=gen), "queries": torch.randn(1, size, 64, generator=gen)}
        batch = {0: ("batch", 1, None)}
        return _Queries().eval(), ExportInputs(value, {"data": batch, "queries": batch},
                                               {"queries": {1: ("queries", 1, 1 << 24)}})
    raise ValueError(f"unknown case {case!r} (families: {', '.join(SIZES)})")


def child_export(case: str, fmt: str, path: str) -> dict:
    from perceivers.commands.export import _write, export_program
    from perceivers.layers import fused_export, native_export, onnx_export

    model, inputs = build(case)
    tracing = {"pt2": fused_export, "pt2-native": native_export, "onnx": onnx_export}[fmt]
    start = time.perf_counter()
    with torch.no_grad(), tracing():
        program, dynamic, _ = export_program(model, inputs)
    _write(program, Path(path), "onnx" if fmt == "onnx" else "pt2")
    return {"export_s": time.perf_counter() - start, "dynamic": dynamic}


def child_run(case: str, fmt: str, path: str, repeats: int) -> dict:
    from perceivers.commands.export import _Outputs, _runner

    model, inputs = build(case)
    eager = _Outputs(model).eval()
    if fmt == "eager":
        def call():
            with torch.no_grad():
                return torch.utils._pytree.tree_leaves(eager(inputs.value))
    else:
        run = _runner(Path(path), "onnx" if fmt == "onnx" else "pt2")
        call = lambda: run(inputs.value)
    peak = measure.PeakMemory(torch.device("cpu"))
    out = call()
    first_peak = peak.peak_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(eager(inputs.value))
    diff = max((g - w).abs().max().item() for g, w in zip(out, want))
    return {"best_s": min(times), "median_s": statistics.median(times), "peak_mib": first_peak / 2**20,
            "max_diff": diff}


def _child(args: list[str], threads: int | None) -> dict:
    command = [sys.executable, __file__, "--child", *args] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(command, check=False, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    """The Markdown table: each case's formats, time against eager mode's."""
    eager = {r["case"]: r["best_s"] for r in rows if r["format"] == "eager" and "best_s" in r}
    out = ["| case | format | dynamic | export s | best s | median s | ×eager | first call's peak | max \\|Δ\\| |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | {r['format']} | failed: {r['error']} |  |  |  |  |  |  |")
            continue
        ratio = f"{eager[r['case']] / r['best_s']:.2f}×" if r["case"] in eager else ""
        export = f"{r['export_s']:.1f}" if "export_s" in r else ""
        out.append(f"| {r['case']} | {r['format']} | {r.get('dynamic', '')} | {export} | {r['best_s']:.3f} | "
                   f"{r['median_s']:.3f} | {ratio} | {r['peak_mib']:.0f} MiB | {r['max_diff']:.1e} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="cases (e.g. readme-1024) or families (readme, vision-io, io-queries)")
    p.add_argument("--formats", nargs="*", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; onnxruntime uses its own, the physical cores)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, case, fmt, path, *rest = args.child
        result = child_export(case, fmt, path) if kind == "export" else child_run(case, fmt, path, int(rest[0]))
        print(json.dumps(result))
        return 0
    sizes = QUICK if args.quick else SIZES
    repeats = 2 if args.quick else args.repeats
    cases = [f"{family}-{size}" for family, values in sizes.items() for size in values]
    if args.only:
        cases = [c for c in cases if c in args.only or c.rsplit("-", 1)[0] in args.only]
    if "onnx" in args.formats:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            print("onnx skipped: pip install 'perceivers[onnx]' installs onnxscript and onnxruntime", file=sys.stderr)
            args.formats = [f for f in args.formats if f != "onnx"]
    desc = measure.machine_description(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for fmt in args.formats:
                path = str(Path(tmp) / f"{case}.{'onnx' if fmt == 'onnx' else 'pt2'}")
                row = {"case": case, "format": fmt}
                if fmt != "eager":
                    row |= _child(["export", case, fmt, path], args.threads)
                if "error" not in row:
                    row |= _child(["run", case, fmt, path, str(repeats)], args.threads)
                rows.append(row)
                print(table(rows).splitlines()[-1], flush=True)
                Path(path).unlink(missing_ok=True)
    from run import machine_tag

    from perceivers.safe_files import atomic_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"exported-{machine_tag(torch.device('cpu'), desc)}" + ("-quick" if args.quick else "")
    with atomic_path(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps({"machine": desc, "repeats": repeats, "rows": rows}, indent=1))
    header = (f"# Exported programs against eager mode\n\nMachine: {desc['cpu']}, {desc['torch_threads']} torch threads;"
              f" torch {desc['torch']}; perceivers {desc.get('perceivers_commit')}. Batch 1; best and median of {repeats}"
              " calls after a first call whose peak is given (above the resident set after loading, each case in a"
              " fresh process); ×eager: eager mode's best time over the format's.\n\n")
    with atomic_path(out / f"{name}.md") as tmp:
        tmp.write_text(header + table(rows))
    print(f"wrote {out / name}.json and .md")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
