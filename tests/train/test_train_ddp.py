"""The same `perceivers fit` command under torchrun (2 processes, DDP on gloo) trains the same model as one
process with the same global batch, and the replicas end identical; a worker killed by a signal is reported
with its own stack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

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
