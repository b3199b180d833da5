"""Benchmark results: JSON persistence, ratios against the fastest peer, and the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from workloads import OURS, human_bytes

__all__ = ["add_ratios", "load", "markdown", "save"]


def load(path: Path) -> dict:
    if path.exists():
        try:
            data = json.loads(path.read_text())
            data.setdefault("workloads", {})
            return data
        except (OSError, json.JSONDecodeError):
            pass
    return {"workloads": {}}


def save(results: dict, path_json: Path, path_md: Path) -> None:
    path_json.write_text(json.dumps(results, indent=1, sort_keys=False))
    path_md.write_text(markdown(results))


def _peak(d: dict | None) -> float | None:
    if not d:
        return None
    mem = d.get("peak_memory") or {}
    return mem.get("peak_bytes")


def add_ratios(entry: dict) -> None:
    """perceivers' speed-up over the fastest peer and its memory relative to the leanest peer."""
    ours = entry["impls"].get(OURS, {})
    peers = {k: v for k, v in entry["impls"].items() if not k.startswith(OURS) and "skipped" not in v}
    summary: dict = {}
    # The headline ratio uses the fastest repeat: on a shared machine interference only ever slows a run
    # down, so the minimum is the least noisy estimate of what each implementation costs. The ratio of
    # medians is kept beside it: where the two disagree (fast cases), the difference is noise.
    for mode in ("infer", "train"):
        for key, suffix in (("min_s", ""), ("median_s", "_median")):
            mine = (ours.get(mode) or {}).get(key)
            theirs = [(v[mode][key], k) for k, v in peers.items() if (v.get(mode) or {}).get(key)]
            if mine and theirs:
                best, who = min(theirs)
                summary[f"{mode}_speedup_vs_fastest_peer{suffix}"] = best / mine
                summary[f"{mode}_fastest_peer{suffix}"] = who
        mine_mem = _peak(ours.get(mode))
        theirs_mem = [(_peak(v.get(mode)), k) for k, v in peers.items() if _peak(v.get(mode))]
        if mine_mem and theirs_mem:
            best, who = min(theirs_mem)
            summary[f"{mode}_memory_vs_leanest_peer"] = mine_mem / best
    entry["summary"] = summary


def fp32_products(rates: dict) -> dict[str, float]:
    """The run's measured fp32 products (``product_<name>_flop_per_s`` entries of ``rates``): name → FLOP/s."""
    return {k[len("product_"):-len("_flop_per_s")]: v for k, v in rates.items() if k.startswith("product_")}


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _ratios(summary: dict, mode: str) -> str:
    """``1.23× / 1.19×``: the speed-up by fastest repeats, then by medians (older results: the first only)."""
    best, median = (summary.get(f"{mode}_speedup_vs_fastest_peer{suffix}") for suffix in ("", "_median"))
    return _times(best, ".2f") + (f" / {median:.2f}×" if median is not None else "")


def _times(x, spec: str) -> str:
    return _fmt(x, spec) + ("×" if x is not None else "")


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    rates = results.get("rates", {})
    lines = ["# perceivers benchmark results", ""]
    ident = m.get("cpu_id") or {}
    cpu = m.get("cpu", "?") + (f" ({ident['core']}, family {ident.get('family')} model {ident.get('model')})"
                               if ident.get("core") else "")
    lines.append(f"Machine: {cpu}, {m.get('cpu_count', '?')} cores ({m.get('torch_threads', '?')} torch "
                 f"threads), {m.get('memory_gib', '?')} GiB" + (f"; GPU {m['gpu']} ({m.get('gpu_memory_gib')} GiB, "
                                                                f"CUDA {m.get('cuda')})" if m.get("gpu") else "")
                 + f"; Python {m.get('python')}, torch {m.get('torch')}; perceivers {m.get('perceivers_commit')}.")
    if rates:
        lines.append("Measured dense matmul rate at the start: " + ", ".join(
            f"{k.replace('_flop_per_s', '').replace('matmul', 'fp32' if k == 'matmul_flop_per_s' else '')} "
            f"{v / 1e9:.0f} GFLOP/s".replace("  ", " ") for k, v in rates.items() if k.startswith("matmul"))
                     + "; each workload also "
                     "times a matmul job interleaved with the models (column *matmul*).")
        products = fp32_products(rates)
        if products:
            lines.append("The fp32 reference is the faster of the available products (" + ", ".join(
                f"{name} {v / 1e9:.0f} GFLOP/s" for name, v in products.items()) + " at the start), "
                "so no implementation is measured against a slow BLAS.")
    optimizers = sorted({(e.get("run") or {}).get("optimizer", "foreach") for e in results.get("workloads", {}).values()})
    if optimizers:
        lines.append(f"Training step: forward + backward + AdamW ({' / '.join(optimizers)}; `foreach` is PyTorch's "
                     "default, `fused` one pass per parameter), the same for every implementation.")
    lines += ["", ("Times are medians of interleaved repeats; ×peer = the fastest peer's fastest repeat / "
              "perceivers' fastest repeat (>1: perceivers is faster; the summary also gives the ratio of medians); "
              "memory = peak above the process's footprint after building the model and inputs, each case in its own process (CPU: peak RSS; CUDA: max_memory_allocated); FLOPs are "
              "counted matmul/attention FLOPs (FlopCounterMode, 2 per multiply-add) of each implementation's "
              "own algorithm; % = achieved FLOP/s over the interleaved matmul rate."), ""]
    header = ("| workload | impl | params | batch | infer s | samples/s | ×peer | train s | ×peer | "
              "peak infer | peak train | GFLOP/sample | train GFLOP/s | % matmul | matmul GFLOP/s | check |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, e in results.get("workloads", {}).items():
        s = e.get("summary", {})
        if e.get("error"):
            lines.append(f"| {name} | – | | {e['batch']} | failed: {e['error']} |" + " |" * 11)
        for impl, d in e["impls"].items():
            if "skipped" in d:
                lines.append(f"| {name} | {impl} | | {e['batch']} | skipped: {d['skipped']} |" + " |" * 11)
                continue
            inf, tr = d.get("infer") or {}, d.get("train") or {}
            is_ours = impl == OURS
            check = d.get("max_abs_diff_vs_perceivers")
            pi, pt = _peak(inf), _peak(tr)
            lines.append(
                "| " + " | ".join([
                    name, f"**{impl}**" if is_ours else impl, f"{d.get('params', 0) / 1e6:.2f}M", str(e["batch"]),
                    _fmt(inf.get("median_s"), ".3f"), _fmt(inf.get("samples_per_s"), ".2f"),
                    _times(s.get("infer_speedup_vs_fastest_peer") if is_ours else None, ".2f"),
                    _fmt(tr.get("median_s"), ".3f"),
                    _times(s.get("train_speedup_vs_fastest_peer") if is_ours else None, ".2f"),
                    human_bytes(pi) if pi else ((inf.get("peak_memory") or {}).get("error") or "–"),
                    human_bytes(pt) if pt else ((tr.get("peak_memory") or {}).get("error") or "–"),
                    _fmt(inf.get("flops_per_sample", None) and inf["flops_per_sample"] / 1e9, ".2f"),
                    _fmt(tr.get("flop_per_s", None) and tr["flop_per_s"] / 1e9, ".1f"),
                    _fmt(tr.get("fraction_of_matmul", None) and 100 * tr["fraction_of_matmul"], ".0f"),
                    _fmt((e.get("matmul_flop_per_s_train") or e.get("matmul_flop_per_s") or 0) / 1e9 or None, ".0f"),
                    f"Δ={check:.1e}" if check is not None else (d.get("note") or ""),
                ]) + " |"
            )
    lines += ["", "## Summary (perceivers relative to the best peer in the same run)", "",
              ("| workload | inference speed-up (fastest repeats / medians) | training speed-up (fastest repeats / "
               "medians) | memory (infer) | memory (train) |"),
              "|---|---|---|---|---|"]
    for name, e in results.get("workloads", {}).items():
        s = e.get("summary", {})
        if not s:
            continue
        lines.append(f"| {name} | {_ratios(s, 'infer')} | {_ratios(s, 'train')} | "
                     f"{_times(s.get('infer_memory_vs_leanest_peer'), '.3f')} | "
                     f"{_times(s.get('train_memory_vs_leanest_peer'), '.3f')} |")
    mfu = [(name, impl, (d.get("infer") or {}).get("mfu"), (d.get("train") or {}).get("mfu"))
           for name, e in results.get("workloads", {}).items() for impl, d in e["impls"].items()]
    mfu = [row for row in mfu if row[2] is not None or row[3] is not None]
    if mfu:
        peak = rates.get("peak_flop_per_s")
        title = (f"## Model FLOP utilisation (counted FLOP/s over the data-sheet dense peak, "
                 f"{_fmt(peak and peak / 1e12, '.1f')} TFLOP/s)")
        lines += ["", title, "",
                  "| workload | impl | inference | training step |", "|---|---|---|---|"]
        lines += [f"| {name} | {impl} | {_fmt(i and 100 * i, '.1f')}% | {_fmt(t and 100 * t, '.1f')}% |"
                  for name, impl, i, t in mfu]
    lines.append("")
    return "\n".join(lines)
