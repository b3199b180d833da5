"""The same `perceivers fit` command under torchrun (2 processes, DDP on gloo) trains the same model as one
process with the same global batch, and the replicas end identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from train_configs import replica_config, write_config

from perceivers import cli

STEPS = 6


def _config(root: Path) -> dict:
    return replica_config(root, STEPS)


def test_torchrun_two_processes_match_one_process(tmp_path: Path):
    single = tmp_path / "single"
    assert cli.main(["fit", "--config", write_config(tmp_path / "single.yaml", _config(single))]) == 0

    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "perceivers.cli", "fit", "--config", write_config(tmp_path / "ddp.yaml", _config(ddp))]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-4000:]

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
