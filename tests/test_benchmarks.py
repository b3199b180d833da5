"""The benchmark script runs end to end (a smoke test: it checks the report, never the timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
