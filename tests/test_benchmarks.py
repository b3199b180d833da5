"""The benchmark script runs end to end (a smoke test: it checks the report, never the timings)."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


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
    assert "at the start: bf16 700000 GFLOP/s;" in text and "_bf16" not in text  # the measured rate, labelled bf16
    assert "989.4 TFLOP/s" in text and "| vision | perceivers | 25.0% | 50.0% |" in text
    assert "peak 989" not in text  # the data sheet's figure is not listed as a measured rate


def test_the_machine_names_the_core_generation(tmp_path):
    """The results tell a Zen 4 host (32 fp32 FLOP per cycle and core) from a Zen 5 one (64), which both
    call themselves "AMD EPYC"."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import measure
    import report

    def ident(family: int, model: int, flags: str, vendor: str = "AuthenticAMD") -> dict:
        path = tmp_path / f"cpuinfo-{family}-{model}"
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                        f"model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu {flags}\n\nprocessor\t: 1\n")
        return measure.cpu_id(str(path))

    genoa = ident(25, 17, "avx2 avx512f avx512_bf16")
    assert genoa == {"vendor": "AuthenticAMD", "family": 25, "model": 17, "stepping": 1, "core": "Zen 4",
                     "isa": ["avx512f", "avx512_bf16"]}
    assert ident(26, 2, "avx512f avx512_bf16")["core"] == "Zen 5"
    assert ident(25, 1, "avx2")["core"] == "Zen 3" and ident(25, 1, "avx2")["isa"] == []
    assert ident(6, 106, "avx512f", "GenuineIntel")["core"] == "Ice Lake"
    assert ident(6, 143, "avx512f avx512_bf16 amx_bf16", "GenuineIntel")["isa"] == ["avx512f", "avx512_bf16", "amx_bf16"]
    assert ident(6, 1, "", "GenuineIntel")["core"] is None  # unknown models name no generation
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


def test_rounds_change_the_order():
    """Each round runs every case once, in an order that changes: no case always follows the same one (a rotation
    of one order made the first implementation always follow the matmul job)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import measure
    import torch

    log = []
    cases = {name: (lambda name=name: log.append(name)) for name in ("perceivers", "peer", "other peer", "matmul")}
    times = measure.alternate(cases, torch.device("cpu"), repeats=12, warmup=0, max_repeats=12)
    assert [len(t) for t in times.values()] == [12] * 4
    rounds = [log[i:i + 4] for i in range(0, len(log), 4)]
    assert all(sorted(r) == sorted(cases) for r in rounds)
    predecessors = {name: {r[r.index(name) - 1] for r in rounds if r.index(name)} for name in cases}
    assert all(len(p) >= 2 for p in predecessors.values()), predecessors
    log.clear()
    measure.alternate(cases, torch.device("cpu"), repeats=12, warmup=0, max_repeats=12)
    assert [log[i:i + 4] for i in range(0, len(log), 4)] == rounds  # seeded: the same orders in every run


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


# ------------------------------------------------------------------------------------------ results files and CLI


def _run_info(started: str, commit: str, precision: str = "fp32", **settings) -> dict:
    return {"started": started, "precision": precision, "optimizer": "fused", "compile": False,
            "keep_freed_memory": False, "device": "cpu", **settings,
            "machine": {"cpu": "AMD EPYC", "cpu_count": 2, "perceivers_commit": commit},
            "rates": {"matmul_flop_per_s": 4.3e11, **({"matmul_bf16_flop_per_s": 7e11} if precision == "bf16" else {})}}


def _entry(name: str, batch: int, run: dict, peak: float | None = None) -> dict:
    mode = {"median_s": 0.5, "min_s": 0.4}
    impls = {impl: {"params": 10, "infer": {**mode, **({"peak_memory": {"peak_bytes": peak * k}} if peak else {})}}
             for impl, k in (("perceivers", 1), ("perceiver-pytorch", 4))}
    return {"workload": name, "batch": batch, "precision": run["precision"], "impls": impls, "run": run}


def test_no_memory_carries_peak_memory_only_from_the_same_batch_and_settings():
    """A ``--no-memory`` re-run showed the earlier entry's peaks whatever batch or precision they were measured at."""
    import report

    old = _entry("w", 8, _run_info("2026-01-01 10:00:00", "aaaaaaa"), peak=2**20)
    for changed, why in ((_entry("w", 2, _run_info("2026-01-02 10:00:00", "bbbbbbb")), "batch 8 ≠ 2"),
                         (_entry("w", 8, _run_info("2026-01-02 10:00:00", "bbbbbbb", "bf16")), "precision fp32 ≠ bf16"),
                         (_entry("w", 8, _run_info("2026-01-02 10:00:00", "bbbbbbb", optimizer="foreach")),
                          "optimizer fused ≠ foreach"),
                         (_entry("w", 8, _run_info("2026-01-02 10:00:00", "bbbbbbb", compile=True)), "compile"),
                         (_entry("w", 8, _run_info("2026-01-02 10:00:00", "bbbbbbb", keep_freed_memory=True)),
                          "keep_freed_memory")):
        differ = report.carry_peak_memory(changed, old)
        assert any(d.startswith(why) for d in differ), differ
        assert "peak_memory" not in changed["impls"]["perceivers"]["infer"]
        assert "infer_memory_vs_leanest_peer" not in changed["summary"]
    same = _entry("w", 8, _run_info("2026-01-02 10:00:00", "bbbbbbb"))
    assert report.carry_peak_memory(same, old) == []
    mem = same["impls"]["perceivers"]["infer"]["peak_memory"]
    assert mem == {"peak_bytes": 2**20, "carried_from": {"started": "2026-01-01 10:00:00", "commit": "aaaaaaa"}}
    assert same["summary"]["infer_memory_vs_leanest_peer"] == pytest.approx(0.25)
    again = _entry("w", 8, _run_info("2026-01-03 10:00:00", "ccccccc"))
    report.carry_peak_memory(again, same)  # carried twice: still named after the run that measured it
    assert again["impls"]["perceivers"]["infer"]["peak_memory"]["carried_from"]["commit"] == "aaaaaaa"
    text = report.markdown({"workloads": {"w": same}})
    assert "| 1.00 MiB (carried from aaaaaaa, 2026-01-01 10:00:00) |" in text


def test_results_are_replaced_atomically_and_a_corrupt_file_is_refused(tmp_path, monkeypatch):
    """A write cut short left a truncated JSON, which the next run read as empty and replaced with its own rows."""
    import report

    results = {"workloads": {"w": _entry("w", 8, _run_info("2026-01-01 10:00:00", "aaaaaaa"))}}
    path = tmp_path / "r.json"
    report.save(results, path, tmp_path / "r.md")
    before = path.read_text()
    real = Path.write_text

    def cut_short(self, text, *args, **kwargs):
        real(self, text[:100], *args, **kwargs)
        raise OSError(27, "File too large")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError, match="File too large"):
        report.save({"workloads": {}}, path, tmp_path / "r.md")
    monkeypatch.undo()
    assert path.read_text() == before and report.load(path) == results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temporary file left
    path.write_text(before[:500])
    with pytest.raises(report.CorruptResults, match=r"r\.json is not valid JSON .*refusing to replace it"):
        report.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(report.CorruptResults, match="expected a JSON object with a 'workloads' object, got list"):
        report.load(path)


def test_a_merged_file_names_the_run_of_every_row():
    """The header described only the last run, and no row said its precision or commit."""
    import report

    fp32 = _entry("a", 8, _run_info("2026-01-01 10:00:00", "aaaaaaa"))
    bf16 = _entry("b", 8, _run_info("2026-01-02 10:00:00", "bbbbbbb", "bf16"))
    old = {k: v for k, v in _entry("c", 2, _run_info("x", "x")).items() if k not in ("run", "precision")}
    text = report.markdown({"machine": {"cpu": "older CPU", "perceivers_commit": "0000000"},
                            "workloads": {"a": fp32, "b": bf16, "c": old}})
    assert "Rows from 3 runs (column *run*)" in text
    assert "- **R2**, started 2026-01-01 10:00:00, fp32, fused AdamW: AMD EPYC, 2 cores" in text
    assert "perceivers aaaaaaa; dense matmul at the start fp32 430 GFLOP/s; 1 workload (a)." in text
    assert "- **R3**, started 2026-01-02 10:00:00, bf16, fused AdamW" in text and "bf16 700 GFLOP/s" in text
    assert "- **R1**, started ?, fp32, foreach AdamW: older CPU" in text  # an entry without run information
    assert "| workload | impl | params | batch | precision | commit | run | infer s |" in text
    assert "| a | **perceivers** | 0.00M | 8 | fp32 | aaaaaaa | R2 | 0.500 |" in text
    assert "| b | perceiver-pytorch | 0.00M | 8 | bf16 | bbbbbbb | R3 | 0.500 |" in text
    assert "| c | **perceivers** | 0.00M | 2 | fp32 | 0000000 | R1 | 0.500 |" in text
    one = report.markdown({"workloads": {"a": fp32}})
    assert "Run started 2026-01-01 10:00:00: fp32, fused AdamW." in one and "| run |" not in one


def test_the_default_results_file_separates_settings():
    import run

    desc = {"cpu": "AMD EPYC", "cpu_count": 2}
    cpu = torch.device("cpu")
    args = run.parse_args([])
    args.precision = "fp32"
    assert run.default_tag(cpu, desc, args) == "cpu-2core-amd-epyc"
    args = run.parse_args(["--precision", "bf16", "--compile", "--keep-freed-memory", "--optimizer", "foreach"])
    assert run.default_tag(cpu, desc, args) == "cpu-2core-amd-epyc-bf16-compile-keep-freed-foreach"
    args = run.parse_args(["--compile", "--freezing", "--no-train"])
    args.precision = "fp32"
    assert run.default_tag(cpu, desc, args) == "cpu-2core-amd-epyc-compile-freezing"
    args = run.parse_args(["--batch-scale", "16"])
    args.precision = "bf16"
    assert run.default_tag(torch.device("cuda"), {"gpu": "NVIDIA H100 80GB HBM3"}, args) == \
        "cuda-nvidia-h100-80gb-hbm3-bf16-batch-x16"


def test_batch_scale_multiplies_every_workload_batch(tmp_path, monkeypatch, capsys):
    import workloads as W

    run = _offline(monkeypatch, [_tiny(W, "tiny")])
    run.main(["--only", "tiny", "--batch-scale", "3", "--repeats", "1", "--budget", "0.1", "--min-time", "0",
              "--no-memory", "--no-flops", "--out", str(tmp_path), "--tag", "scaled"])
    assert json.loads((tmp_path / "scaled.json").read_text())["workloads"]["tiny"]["batch"] == 24
    assert "--batch-scale: expected a whole number of at least 1, got 0" in _error_of(capsys, ["--batch-scale", "0"])


def test_profile_step_reports_time_flops_and_operators(tmp_path):
    out = tmp_path / "profile.txt"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "sweep-perceiver-32", "--mode", "infer",
           "--warmup", "1", "--steps", "1", "--profile-steps", "1", "--rows", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert "sweep-perceiver-32" in report and "infer, batch 1, fp32" in report and "GFLOP per step" in report
    # the operator table, led by the products: MKL's, or oneDNN's (AMD; a latent array's on AMX)
    assert any(op in report for op in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"))
    bad = subprocess.run([*cmd[:2], "no-such-workload"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "unknown workload 'no-such-workload'" in bad.stderr


def _error_of(capsys, argv) -> str:
    import run

    with pytest.raises(SystemExit) as exit_:
        run.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_nothing_selected_or_a_bad_device_is_a_one_line_error(capsys, monkeypatch):
    import run

    monkeypatch.setattr(run.measure, "matmul_rates", lambda *a, **k: pytest.fail("measured before the error"))
    err = _error_of(capsys, ["--only", "no-such-workload", "--quick"])
    assert "no workload matches --only no-such-workload after --skip large; expected at least one" in err
    err = _error_of(capsys, ["--only", "readme-64-untie", "--skip", "readme"])
    assert "--only readme-64-untie after --skip readme" in err
    assert "--device: expected cpu or cuda[:N], got 'foo'" in _error_of(capsys, ["--device", "foo"])
    assert "got 'mps'" in _error_of(capsys, ["--device", "mps"])
    assert "--freezing: applies to compiled models; add --compile" in _error_of(capsys, ["--freezing"])
    if torch.cuda.is_available():
        assert "expected an index below" in _error_of(capsys, ["--device", "cuda:99"])
    else:
        assert "--device cuda: expected a CUDA device, got none" in _error_of(capsys, ["--device", "cuda"])


def _tiny(W, name: str, build=None):
    def linear(impl: str, device: torch.device):
        if impl != W.OURS:
            raise W.Unavailable("peer-package is not installed")
        torch.manual_seed(0)
        return W.Built(torch.nn.Linear(8, 4), lambda m, inp: m(inp[0]))

    return W.Workload(name=name, family="test", description="one linear layer", batch=8, elements=8,
                      impls=(W.OURS, "peer"), build=build or linear, inputs=lambda b, device: (torch.randn(b, 8),))


def _offline(monkeypatch, workloads):
    """run.main without measuring the machine: fixed rates, a no-op matmul job, the given workloads."""
    import run

    monkeypatch.setattr(run.W, "all_workloads", lambda: workloads)
    monkeypatch.setattr(run.measure, "machine_description", lambda device: {"cpu": "test", "cpu_count": 2,
                                                                           "perceivers_commit": "ddddddd"})
    monkeypatch.setattr(run.measure, "matmul_rates", lambda *a, **k: {"torch.matmul": 1e11})
    monkeypatch.setattr(run.measure, "matmul_case", lambda *a, **k: (lambda: None, 10**9))
    monkeypatch.setattr(run.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM alone
    return run


def test_a_missing_peer_is_skipped_and_a_failed_rerun_keeps_the_good_entry(tmp_path, monkeypatch, capsys):
    """A missing peer failed the whole workload (perceivers unmeasured), the failed row said batch 8 after --quick ran
    2, the run exited 0, and the failure replaced the earlier good entry."""
    import workloads as W

    def broken(impl, device):
        raise RuntimeError("out of memory")

    run = _offline(monkeypatch, [_tiny(W, "good"), _tiny(W, "new", broken)])
    out = ["--quick", "--no-memory", "--out", str(tmp_path), "--tag", "t", "--only", "good", "new", "--repeats", "1"]
    with pytest.raises(SystemExit) as exit_:
        run.main(out)
    assert exit_.value.code == 1
    assert "1 workload(s) failed: new" in capsys.readouterr().err
    results = json.loads((tmp_path / "t.json").read_text())["workloads"]
    good = results["good"]
    assert good["impls"]["peer"] == {"skipped": "peer-package is not installed"}
    assert good["impls"]["perceivers"]["train"]["median_s"] > 0
    assert results["new"]["batch"] == 2 and results["new"]["error"] == "RuntimeError: out of memory"
    assert "| new | – |  | 2 | fp32 | ddddddd | failed: RuntimeError: out of memory |" in (tmp_path / "t.md").read_text()
    run = _offline(monkeypatch, [_tiny(W, "good", broken)])
    with pytest.raises(SystemExit):
        run.main(out[:-4] + ["--only", "good"])
    assert "good failed (RuntimeError: out of memory); kept its earlier entry" in capsys.readouterr().err
    assert json.loads((tmp_path / "t.json").read_text())["workloads"]["good"] == good


def test_a_corrupt_results_file_ends_the_run_before_measuring(tmp_path, monkeypatch, capsys):
    import workloads as W

    run = _offline(monkeypatch, [_tiny(W, "good")])
    monkeypatch.setattr(run.measure, "matmul_rates", lambda *a, **k: pytest.fail("measured before the error"))
    (tmp_path / "t.json").write_text('{"workloads": {"a": ')
    err = _error_of(capsys, ["--out", str(tmp_path), "--tag", "t", "--only", "good"])
    assert "t.json is not valid JSON" in err and (tmp_path / "t.json").read_text() == '{"workloads": {"a": '


def test_required_peers_missing_leave_perceivers_alone(monkeypatch):
    import importlib.util

    import workloads as W

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("perceiver_pytorch", "transformers") else real(name, *a))
    assert W.peer_unavailable(W.LR).startswith("perceiver-pytorch is not installed")
    assert W.peer_unavailable(W.HF).startswith("transformers is not installed")
    cpu = torch.device("cpu")
    cfg = dict(W.README_IO, depth=1, num_latents=8, latent_dim=32, latent_heads=2, cross_dim_head=8, latent_dim_head=8)
    ours = W._lr_family_builder("io", cfg)(W.OURS, cpu)
    assert ours.note == "own init" and W.parameter_count(ours.model) > 0
    with pytest.raises(W.Unavailable, match="perceiver-pytorch is not installed"):
        W._lr_family_builder("io", cfg)(W.LR, cpu)
    io_dm = {w.name: w for w in W.all_workloads()}["io-dm-2048x128"]
    with pytest.raises(W.Unavailable, match="built from transformers' model here, and transformers is not installed"):
        io_dm.build(W.OURS, cpu)


def test_an_interrupted_memory_measurement_kills_its_child(monkeypatch):
    """SIGTERM during the peak-memory phase left the ``--memory-case`` child running (reparented to init)."""
    import run

    children = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        children.append(real(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(run, "memory_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(run.subprocess, "Popen", popen)
    previous = signal.signal(signal.SIGALRM, run._exit_on_sigterm)  # what main installs for SIGTERM
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(SystemExit):
            run.measure_memory(None, None, "perceivers", "infer", 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert children and children[0].poll() is not None  # killed and reaped, not left behind


def test_the_recorded_commit_is_the_imported_packages_checkout(tmp_path, monkeypatch):
    import measure

    import perceivers

    package = tmp_path / "src" / "perceivers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(perceivers, "__file__", str(package / "__init__.py"))
    source = measure.perceivers_source()
    assert source == {"perceivers_commit": head, "perceivers_version": perceivers.__version__,
                      "perceivers_file": str(package.resolve())}
    (package / "__init__.py").write_text("x = 1\n")
    assert measure.perceivers_source()["perceivers_commit"] == head + "-dirty"


def test_exported_programs_benchmark_reports_each_format(tmp_path):
    """benchmarks/exported.py writes, loads and times a program per format, each in its own process, against eager
    mode (the smallest case: 4096 queries of a dynamic query count)."""
    formats = ["eager", "pt2"] + (["onnx"] if importlib.util.find_spec("onnxruntime") and
                                  importlib.util.find_spec("onnxscript") else [])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "exported.py"), "--quick", "--only", "io-queries",
           "--formats", *formats, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (results,) = tmp_path.glob("exported-*-quick.json")
    rows = json.loads(results.read_text())["rows"]
    assert [(r["case"], r["format"]) for r in rows] == [("io-queries-4096", f) for f in formats]
    for row in rows:
        assert row["best_s"] > 0 and row["peak_mib"] >= 0 and row["max_diff"] < 1e-4
        assert ("export_s" in row) == (row["format"] != "eager")
    assert rows[1]["dynamic"] == "dynamic: batch and size"
    table = results.with_suffix(".md").read_text()
    assert "| io-queries-4096 | pt2 | dynamic: batch and size |" in table and "×eager" in table
