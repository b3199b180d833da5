"""Benchmark results: JSON persistence, ratios against the fastest peer, and the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from workloads import OURS, human_bytes

from perceivers.safe_files import atomic_write_text, read_json

__all__ = ["CorruptResults", "add_ratios", "carry_peak_memory", "load", "markdown", "save"]

# The settings a peak memory depends on besides the workload: an entry's peak is carried over to a
# ``--no-memory`` re-run only where all of them match (older entries: their defaults then).
MEMORY_SETTINGS = {"device": "cpu", "precision": "fp32", "optimizer": "foreach", "compile": False,
                   "freezing": False, "keep_freed_memory": False}


class CorruptResults(ValueError):
    """An existing results file that cannot be read as results."""


def load(path: Path) -> dict:
    """The results in ``path`` (none yet: an empty file); a corrupt file is refused, never treated as empty."""
    if not path.exists():
        return {"workloads": {}}
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise CorruptResults(f"{exc}; refusing to replace it (move it aside, or pass another --tag or --out)") from exc
    if not isinstance(data, dict) or not isinstance(data.setdefault("workloads", {}), dict):
        raise CorruptResults(f"{path}: expected a JSON object with a 'workloads' object, got "
                             f"{type(data).__name__}; refusing to replace it (move it aside, or pass another --tag "
                             "or --out)")
    return data


def save(results: dict, path_json: Path, path_md: Path) -> None:
    """Write the JSON and its Markdown table, each atomically (a temporary file, then ``os.replace``)."""
    atomic_write_text(path_json, json.dumps(results, indent=1, sort_keys=False))
    atomic_write_text(path_md, markdown(results))


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


def _memory_settings(entry: dict) -> dict:
    run = entry.get("run") or {}
    return {"batch": entry.get("batch"),
            **{k: run.get(k, entry.get(k, default)) for k, default in MEMORY_SETTINGS.items()}}


def carry_peak_memory(entry: dict, old: dict | None) -> list[str]:
    """Copy the peak memory of ``old`` (an earlier entry of the workload) into ``entry`` (a ``--no-memory`` run), marked
    with the run that measured it, if the batch and the :data:`MEMORY_SETTINGS` match; else copy nothing and return
    the differences (``["batch 8 ≠ 2", ...]``). The memory ratios are recomputed either way."""
    if not old:
        return []
    was, now = _memory_settings(old), _memory_settings(entry)
    differ = [f"{k} {was[k]} ≠ {now[k]}" for k in now if was[k] != now[k]]
    if not differ:
        run = old.get("run") or {}
        origin = {"started": run.get("started"), "commit": (run.get("machine") or {}).get("perceivers_commit")}
        for impl, d in entry["impls"].items():
            for mode in ("infer", "train"):
                mem = ((old["impls"].get(impl) or {}).get(mode) or {}).get("peak_memory")
                if mem and mode in d:
                    d[mode]["peak_memory"] = {**mem, "carried_from": mem.get("carried_from") or origin}
    add_ratios(entry)
    return differ


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


_RATE_LABELS = {"matmul_flop_per_s": "fp32", "matmul_bf16_flop_per_s": "bf16"}


def _machine(m: dict) -> str:
    """One line on the machine and the code of a run (its ``machine`` description)."""
    ident = m.get("cpu_id") or {}
    cpu = m.get("cpu", "?") + (f" ({ident['core']}, family {ident.get('family')} model {ident.get('model')})"
                               if ident.get("core") else "")
    version = f" {m['perceivers_version']}" if m.get("perceivers_version") else ""
    return (f"{cpu}, {m.get('cpu_count', '?')} cores ({m.get('torch_threads', '?')} torch threads), "
            f"{m.get('memory_gib', '?')} GiB" + (f"; GPU {m['gpu']} ({m.get('gpu_memory_gib')} GiB, CUDA {m.get('cuda')})"
                                                if m.get("gpu") else "")
            + f"; Python {m.get('python')}, torch {m.get('torch')}; perceivers{version} {m.get('perceivers_commit')}")


def _rates(rates: dict) -> str:
    """``fp32 430 GFLOP/s, bf16 700 GFLOP/s``: the dense matmul rates measured at a run's start."""
    return ", ".join(f"{_RATE_LABELS.get(k, k.replace('_flop_per_s', ''))} {v / 1e9:.0f} GFLOP/s"
                     for k, v in rates.items() if k.startswith("matmul"))


def _products_note(rates: dict) -> str:
    products = fp32_products(rates)
    return ", ".join(f"{name} {v / 1e9:.0f} GFLOP/s" for name, v in products.items())


def _settings_text(run: dict) -> str:
    return ", ".join([run.get("precision") or "fp32", f"{run.get('optimizer', 'foreach')} AdamW"]
                     + (["torch.compile"] if run.get("compile") else [])
                     + (["Inductor freezing"] if run.get("freezing") else [])
                     + (["--keep-freed-memory"] if run.get("keep_freed_memory") else []))


def _run_of(results: dict, e: dict) -> dict:
    """The run that measured entry ``e``; without run information (none so far) the file's last run."""
    return e.get("run") or {"machine": results.get("machine", {}), "rates": results.get("rates", {})}


def _run_key(run: dict) -> tuple[str, str]:
    return run.get("started") or "", (run.get("machine") or {}).get("perceivers_commit") or ""


def runs(results: dict) -> list[tuple[str, dict, list[str]]]:
    """The runs whose rows a results file holds, oldest first: ``(label, run, workloads)``."""
    found: dict = {}
    for name, e in results.get("workloads", {}).items():
        run = _run_of(results, e)
        found.setdefault(_run_key(run), (run, []))[1].append(name)
    return [(f"R{i}", run, names) for i, (_, (run, names)) in enumerate(sorted(found.items()), 1)]


def _memory(d: dict) -> str:
    """A peak-memory cell: the bytes, marked when carried over from an earlier run, or the error."""
    mem = d.get("peak_memory") or {}
    if not mem.get("peak_bytes"):
        return mem.get("error") or "–"
    came = mem.get("carried_from")
    return human_bytes(mem["peak_bytes"]) + (f" (carried from {came.get('commit')}, {came.get('started')})"
                                             if came else "")


def markdown(results: dict) -> str:
    merged = runs(results)
    lines = ["# perceivers benchmark results", ""]
    if len(merged) <= 1:  # one run: the machine, its rates and its settings
        run = merged[0][1] if merged else _run_of(results, {})
        rates = run.get("rates") or {}
        lines.append(f"Machine: {_machine(run.get('machine') or {})}.")
        if run.get("started"):
            lines.append(f"Run started {run['started']}: {_settings_text(run)}.")
        if rates:
            lines.append(f"Measured dense matmul rate at the start: {_rates(rates)}; each workload also times a "
                         "matmul job interleaved with the models (column *matmul*).")
            if fp32_products(rates):
                lines.append(f"The fp32 reference is the faster of the available products ({_products_note(rates)} "
                             "at the start), so no implementation is measured against a slow BLAS.")
    else:  # rows from several runs: each listed, each row naming its own (column *run*)
        lines.append(f"Rows from {len(merged)} runs (column *run*); each row was measured with its own run's "
                     "machine, code, settings and matmul rates:")
        for label, run, names in merged:
            rates = run.get("rates") or {}
            products = f" ({_products_note(rates)})" if fp32_products(rates) else ""
            lines.append(f"- **{label}**, started {run.get('started', '?')}, {_settings_text(run)}: "
                         f"{_machine(run.get('machine') or {})}; dense matmul at the start {_rates(rates)}{products}; "
                         f"{len(names)} workload{'s' if len(names) > 1 else ''} ({', '.join(names)}).")
        lines.append("Each workload also times a matmul job interleaved with the models (column *matmul*); the fp32 "
                     "reference is the faster of the available products, so no implementation is measured against a "
                     "slow BLAS.")
    rates = (merged[-1][1].get("rates") if merged else None) or results.get("rates", {})
    optimizers = sorted({(e.get("run") or {}).get("optimizer", "foreach") for e in results.get("workloads", {}).values()})
    if optimizers:
        lines.append(f"Training step: forward + backward + AdamW ({' / '.join(optimizers)}; `foreach` is PyTorch's "
                     "default, `fused` one pass per parameter), the same for every implementation.")
    lines += ["", ("Times are medians of interleaved repeats; ×peer = the fastest peer's fastest repeat / "
              "perceivers' fastest repeat (>1: perceivers is faster; the summary also gives the ratio of medians); "
              "memory = peak above the process's footprint after building the model and inputs, each case in its own "
              "process (CPU: peak RSS; CUDA: max_memory_allocated; *carried*: measured by an earlier run with the same "
              "batch and settings, this one ran with `--no-memory`); FLOPs are "
              "counted matmul/attention FLOPs (FlopCounterMode, 2 per multiply-add) of each implementation's "
              "own algorithm; % = achieved FLOP/s over the interleaved matmul rate."), ""]
    several = len(merged) > 1
    columns = (["workload", "impl", "params", "batch", "precision", "commit"] + (["run"] if several else [])
               + ["infer s", "samples/s", "×peer", "train s", "×peer", "peak infer", "peak train", "GFLOP/sample",
                  "train GFLOP/s", "% matmul", "matmul GFLOP/s", "check"])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def table_row(cells: list[str]) -> str:
        return "| " + " | ".join(cells + [""] * (len(columns) - len(cells))) + " |"

    for name, e in results.get("workloads", {}).items():
        s = e.get("summary", {})
        run = _run_of(results, e)
        ident = [str(e["batch"]), e.get("precision") or run.get("precision") or "fp32",
                 str((run.get("machine") or {}).get("perceivers_commit"))] + (
                     [label for label, r, _ in merged if _run_key(r) == _run_key(run)] if several else [])
        if e.get("error"):
            lines.append(table_row([name, "–", "", *ident, f"failed: {e['error']}"]))
        for impl, d in e["impls"].items():
            if "skipped" in d:
                lines.append(table_row([name, impl, "", *ident, f"skipped: {d['skipped']}"]))
                continue
            inf, tr = d.get("infer") or {}, d.get("train") or {}
            is_ours = impl == OURS
            check = d.get("max_abs_diff_vs_perceivers")
            lines.append(table_row([
                name, f"**{impl}**" if is_ours else impl, f"{d.get('params', 0) / 1e6:.2f}M", *ident,
                _fmt(inf.get("median_s"), ".3f"), _fmt(inf.get("samples_per_s"), ".2f"),
                _times(s.get("infer_speedup_vs_fastest_peer") if is_ours else None, ".2f"),
                _fmt(tr.get("median_s"), ".3f"),
                _times(s.get("train_speedup_vs_fastest_peer") if is_ours else None, ".2f"),
                _memory(inf), _memory(tr),
                _fmt(inf.get("flops_per_sample", None) and inf["flops_per_sample"] / 1e9, ".2f"),
                _fmt(tr.get("flop_per_s", None) and tr["flop_per_s"] / 1e9, ".1f"),
                _fmt(tr.get("fraction_of_matmul", None) and 100 * tr["fraction_of_matmul"], ".0f"),
                _fmt((e.get("matmul_flop_per_s_train") or e.get("matmul_flop_per_s") or 0) / 1e9 or None, ".0f"),
                f"Δ={check:.1e}" if check is not None else (d.get("note") or ""),
            ]))
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
