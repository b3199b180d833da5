"""The same `perceivers fit` command under torchrun (2 processes, DDP on gloo) trains the same model as one
process with the same global batch, and the replicas end identical; a worker killed by a signal is reported
with its own stack."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from train_configs import replica_config, write_config
from train_torchrun import TORCHRUN, env, failure, fresh, killed_by_signal, run_standalone

from perceivers import cli

STEPS = 6


def _config(root: Path) -> dict:
    return replica_config(root, STEPS)


def test_torchrun_two_processes_match_one_process(tmp_path: Path):
    single = tmp_path / "single"
    assert cli.main(["fit", "--config", write_config(tmp_path / "single.yaml", _config(single))]) == 0

    ddp = tmp_path / "ddp"
    out = run_standalone(["fit", "--config", write_config(tmp_path / "ddp.yaml", _config(ddp))], timeout=240,
                         prepare=fresh(ddp))
    assert out.returncode == 0, failure(out)

    report = json.loads((ddp / "replica_check.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == STEPS
    assert report["max_abs_diff"] == 0.0, report  # both ranks hold exactly the same parameters

    a = torch.load(single / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    for name, value in a["state_dict"].items():
        # float sums in another order only; a different batch split would move weights by ~2 * lr = 2e-3
        torch.testing.assert_close(b["state_dict"][name], value, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _test_metrics(root: Path) -> dict[str, float]:
    rows = [row for row in csv.DictReader((root / "metrics.csv").open()) if row.get("test/acc")]
    return {key: float(rows[-1][key]) for key in ("test/acc", "test/loss")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    """A 2-step digits run whose config records ``devices: 2``: its config file and last checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    root = tmp / "run"
    config = write_config(tmp / "run.yaml", replica_config(root, 2))
    assert cli.main(["fit", "--config", config]) == 0
    return config, str(root / "checkpoints" / "last.ckpt")


def test_two_processes_test_every_sample_once(tmp_path: Path, trained):
    """``perceivers test`` on 2 processes gives the one-process metrics: the digits test split has 359 images,
    which Lightning's sampler padded to 360 (a sample counted twice)."""
    config, ckpt = trained
    one, two = tmp_path / "one", tmp_path / "two"
    every = ["--trainer.limit_test_batches", "1.0", "--ckpt_path", ckpt]
    assert cli.main(["test", "--config", config, "--trainer.devices", "1", "--trainer.default_root_dir", str(one),
                     *every]) == 0
    out = run_standalone(["test", "--config", config, "--trainer.default_root_dir", str(two), *every], timeout=240)
    assert out.returncode == 0, failure(out)
    single, sharded = _test_metrics(one), _test_metrics(two)
    assert single["test/acc"] * 359 == pytest.approx(round(single["test/acc"] * 359), abs=1e-4)  # a count of 359
    assert sharded["test/acc"] == pytest.approx(single["test/acc"], abs=1e-7)
    assert sharded["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)


def test_two_processes_predict_every_sample_in_order(tmp_path: Path, trained):
    """``perceivers predict`` on 2 processes writes the one-process predictions.csv: all 359 test images in the
    dataset's order (it wrote rank 0's 180: images 0, 2, 4, … numbered 0, 1, 2, …)."""
    config, ckpt = trained
    one, two = tmp_path / "one", tmp_path / "two"
    every = ["--trainer.limit_predict_batches", "1.0", "--ckpt_path", ckpt]
    assert cli.main(["predict", "--config", config, "--trainer.devices", "1", "--trainer.default_root_dir", str(one),
                     *every]) == 0
    out = run_standalone(["predict", "--config", config, "--trainer.default_root_dir", str(two), *every],
                         timeout=240)
    assert out.returncode == 0, failure(out)
    single = list(csv.DictReader((one / "predictions.csv").open()))
    sharded = list(csv.DictReader((two / "predictions.csv").open()))
    assert len(single) == len(sharded) == 359
    assert [(r["index"], r["prediction"]) for r in sharded] == [(r["index"], r["prediction"]) for r in single]
    for a, b in zip(single, sharded, strict=True):
        assert float(b["probability"]) == pytest.approx(float(a["probability"]), abs=2e-6)


def test_a_process_killed_by_a_signal_is_reported_with_its_stack(tmp_path: Path):
    """What the torchrun tests show when a process dies by a signal: the signal and that process's Python stack
    (the fault handler), not only its peer's lost connection."""
    script = tmp_path / "abort.py"
    script.write_text("import os\n\n\ndef crash():\n    os.abort()\n\n\ncrash()\n")
    out = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "1", str(script)], env=env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and killed_by_signal(out) == 6
    report = failure(out)
    assert "Fatal Python error: Aborted" in report and f'File "{script}", line 5 in crash' in report, report
