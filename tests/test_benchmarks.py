"""The benchmark script runs end to end (a smoke test: it checks the report, never the timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    summary = entry["summary"]
    assert summary["train_fastest_peer"] == summary["train_fastest_peer_median"] == "perceiver-pytorch"
    for mode in ("infer", "train"):  # by fastest repeats and by medians
        median = {k: v[mode]["median_s"] for k, v in entry["impls"].items()}
        assert summary[f"{mode}_speedup_vs_fastest_peer_median"] == pytest.approx(median["perceiver-pytorch"] / median["perceivers"])
    assert entry["run"]["optimizer"] == "fused" and entry["run"]["precision"] == "fp32"
    table = (tmp_path / "smoke.md").read_text()
    assert "io-2048x128" in table and "perceiver-pytorch" in table
    assert f"| io-2048x128 | {summary['infer_speedup_vs_fastest_peer']:.2f}× / " in table  # both ratios in the summary


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


def test_the_machine_names_the_core_generation(tmp_path):
    """The results tell a Zen 4 host (32 fp32 FLOP per cycle and core) from a Zen 5 one (64), which both
    call themselves "AMD EPYC"."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import measure
    import report

    def ident(family: int, model: int, flags: str) -> dict:
        path = tmp_path / f"cpuinfo-{family}-{model}"
        path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                        f"model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu {flags}\n\nprocessor\t: 1\n")
        return measure.cpu_id(str(path))

    genoa = ident(25, 17, "avx2 avx512f avx512_bf16")
    assert genoa == {"vendor": "AuthenticAMD", "family": 25, "model": 17, "stepping": 1, "core": "Zen 4",
                     "isa": ["avx512f", "avx512_bf16"]}
    assert ident(26, 2, "avx512f avx512_bf16")["core"] == "Zen 5"
    assert ident(25, 1, "avx2")["core"] == "Zen 3" and ident(25, 1, "avx2")["isa"] == []
    assert measure.cpu_id(str(tmp_path / "missing")) == {}
    line = report.markdown({"machine": {"cpu": "AMD EPYC", "cpu_count": 2, "cpu_id": genoa}}).splitlines()[2]
    assert line.startswith("Machine: AMD EPYC (Zen 4, family 25 model 17), 2 cores")


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


@pytest.mark.slow  # compiles a depth-6 PerceiverIO (~30 s)
def test_compiled_steps_match_eager_and_failures_are_dropped(capsys):
    """``--compile``: the compiled step trains like the eager one; an implementation that fails to compile is
    reported and left out instead of ending the run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run
    import workloads as W

    cpu = torch.device("cpu")
    wl = {w.name: w for w in W.all_workloads()}["io-2048x128"]
    inputs = wl.inputs(1, cpu)
    weights = []
    for compile in (False, True):
        torch.manual_seed(0)
        built = wl.build(W.OURS, cpu)
        step = run.make_step(built, inputs, cpu, "fp32", compile=compile)
        if compile:
            step = run.compiled({"ours": step}, cpu)["ours"]  # two steps taken while compiling
        else:
            step(), step()
        weights.append(next(built.model.parameters()).detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)

    def broken() -> None:
        raise RuntimeError("cannot compile this")

    assert list(run.compiled({"ok": lambda: None, "broken": broken}, cpu)) == ["ok"]
    assert "broken: torch.compile failed: RuntimeError: cannot compile this" in capsys.readouterr().out


_NEW_PEERS = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import workloads as W

cpu = torch.device("cpu")
tiny = [
    W.flash_workload("fp", 12, 2),
    W.ar_krasserm_workload("kr", {**W.AR_KRASSERM, "max_seq_len": 24, "num_latents": 8, "num_channels": 32,
                                  "num_heads": 4, "num_self_attention_layers": 2}, 2),
    W.ar_lucidrains_workload("lr", {**W.AR_LUCIDRAINS, "num_tokens": 50, "dim": 32, "depth": 1, "heads": 2,
                                    "dim_head": 32, "max_seq_len": 20, "cross_attn_seq_len": 12}, 2),
]
tiny[0].build = W._flash_builder({**W.FLASH_BENCH, "depth": 2, "latent_dim": 32, "num_latents": 8})
for wl in tiny:
    ours, peer = (wl.build(impl, cpu) for impl in wl.impls)
    assert W.peer_unavailable(wl.impls[1], cpu) is None, wl.impls[1]
    assert W.parameter_count(ours.model) == W.parameter_count(peer.model) > 0
    x = wl.inputs(wl.batch, cpu)
    with torch.no_grad():
        a, b = (m.run(m.model.eval(), x) for m in (ours, peer))
    assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5, float((a - b).abs().max())
W.FP_REFS = W.AR_LR_REFS = W.KR_REFS = W.Path("/nonexistent")
W._REFS = {k: (W.Path("/nonexistent"), *v[1:]) for k, v in W._REFS.items()}
for wl in tiny:  # a missing refs folder: the peer is reported unavailable, perceivers runs alone
    assert "not found (make setup installs" in W.peer_unavailable(wl.impls[1])
    assert wl.build(W.OURS, cpu).note == "own init"
print("OK")
"""


def test_new_peer_builders_agree_at_tiny_size():
    """FlashPerceiver, krasserm's and lucidrains' Perceiver AR: same parameters and outputs as perceivers."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import workloads

    missing = [impl for impl in (workloads.FP, workloads.KR, workloads.AR_LR) if workloads.peer_unavailable(impl)]
    if missing:
        pytest.skip(f"optional peers not installed: {missing}")
    proc = subprocess.run([sys.executable, "-c", _NEW_PEERS, str(ROOT / "benchmarks")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


@pytest.mark.parametrize("onednn", [True, False])
def test_products_of_a_step_are_recorded_and_counted(onednn):
    """benchmarks/products.py: every product of a step found once per call, 2 FLOPs per multiply-add."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import products

    from perceivers.layers import Linear, use_onednn

    layer = Linear(256, 512)
    x = torch.randn(64, 256, requires_grad=True)

    def step():
        with use_onednn(onednn):
            layer(x).square().sum().backward()

    res = products.products_of_step(step, repeats=1)
    assert res["calls"] == 3  # forward, input gradient, weight gradient
    assert res["flop"] == 3 * 2 * 64 * 256 * 512
    assert res["isolated_s"] > 0
