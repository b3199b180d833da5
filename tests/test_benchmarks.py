"""The benchmark script runs end to end (a smoke test: it checks the report, never the timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_reports_every_implementation_on_the_same_weights(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "io-2048x128", "--quick", "--repeats", "1",
           "--budget", "0.5", "--no-memory", "--out", str(tmp_path), "--tag", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((tmp_path / "smoke.json").read_text())["workloads"]["io-2048x128"]
    ours, peer = entry["impls"]["perceivers"], entry["impls"]["perceiver-pytorch"]
    assert ours["params"] == peer["params"] > 0
    assert peer["max_abs_diff_vs_perceivers"] < 1e-4  # the peer ran perceivers' weights
    for impl in (ours, peer):
        for mode in ("infer", "train"):
            assert impl[mode]["median_s"] > 0 and impl[mode]["flop_per_s"] > 0
    assert entry["summary"]["train_fastest_peer"] == "perceiver-pytorch"
    assert entry["run"]["optimizer"] == "fused" and entry["run"]["precision"] == "fp32"
    table = (tmp_path / "smoke.md").read_text()
    assert "io-2048x128" in table and "perceiver-pytorch" in table


def test_gpu_data_sheet_peaks_feed_the_utilisation_table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import measure
    import report

    assert measure.gpu_peak_flop_per_s("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert measure.gpu_peak_flop_per_s("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.0e12)  # not the SXM part's
    assert measure.gpu_peak_flop_per_s("NVIDIA H200", "fp32") == pytest.approx(494.7e12)  # TF32
    assert measure.gpu_peak_flop_per_s("NVIDIA GeForce RTX 4090", "bf16") is None
    results = {"machine": {"gpu": "NVIDIA H200"}, "rates": {"matmul_bf16_flop_per_s": 7.0e14, "peak_flop_per_s": 989.4e12},
               "workloads": {"vision": {"batch": 1, "summary": {}, "impls": {"perceivers": {
                   "params": 10, "infer": {"median_s": 0.1, "mfu": 0.25}, "train": {"median_s": 0.3, "mfu": 0.5}}}}}}
    text = report.markdown(results)
    assert "bf16 700000 GFLOP/s" in text  # the measured rate
    assert "989.4 TFLOP/s" in text and "| vision | perceivers | 25.0% | 50.0% |" in text
    assert "peak 989" not in text  # the data sheet's figure is not listed as a measured rate


def test_fast_cases_get_more_rounds_up_to_the_cap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import measure
    import torch

    cases = {"a": lambda: None, "b": lambda: None}
    cpu = torch.device("cpu")
    assert [len(t) for t in measure.alternate(cases, cpu, repeats=3).values()] == [3, 3]
    more = measure.alternate(cases, cpu, repeats=3, min_time_s=60.0, max_repeats=7)
    assert [len(t) for t in more.values()] == [7, 7]  # the cap ends it long before a minute
    capped = measure.alternate(cases, cpu, repeats=3, min_time_s=60.0, max_repeats=7, budget_s=0.0)
    assert [len(t) for t in capped.values()] == [1, 1]  # the budget ends it after one round
