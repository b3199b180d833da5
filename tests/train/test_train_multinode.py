"""Two "nodes" on this machine: two separately started `torchrun --nnodes 2 --nproc_per_node 1` launchers that
meet on 127.0.0.1 (static master address and node ranks, or c10d rendezvous) train with DDP exactly the
weights of one `torchrun --standalone --nproc_per_node 2` launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_configs import replica_config, write_config
from train_torchrun import failure, free_port, fresh, load, max_weight_diff, run_nodes, run_standalone

STEPS = 6


def _config(root: Path) -> dict:
    return replica_config(root, STEPS)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("standalone")
    out = run_standalone(["fit", "--config", write_config(tmp / "c.yaml", _config(tmp / "run"))],
                         prepare=fresh(tmp / "run"))
    assert out.returncode == 0, failure(out)
    return tmp / "run"


def _launchers(rendezvous: str) -> list[list[str]]:
    port = free_port()
    common = ["--nnodes", "2", "--nproc_per_node", "1"]
    if rendezvous == "static":  # what a cluster script with fixed node ranks does
        return [[*common, "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
                for rank in (0, 1)]
    # c10d: identical commands on every node; ranks are assigned at the rendezvous
    return [[*common, "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "perceivers-test"]
            for _ in (0, 1)]


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_train_like_one_node(standalone, tmp_path, rendezvous):
    run = tmp_path / "run"
    codes = run_nodes(_launchers(rendezvous), ["fit", "--config", write_config(tmp_path / "c.yaml", _config(run))],
                      tmp_path / "logs", timeout=300)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert codes == [0, 0], logs

    resolved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert resolved["num_nodes"] == 2 and resolved["devices"] == 1 and resolved["strategy"] == "ddp"
    report = json.loads((run / "replica_check.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == STEPS and report["max_abs_diff"] == 0.0

    nodes, single_node = load(run / "checkpoints" / "last.ckpt"), load(standalone / "checkpoints" / "last.ckpt")
    assert nodes["global_step"] == single_node["global_step"] == STEPS
    diff = max_weight_diff(single_node, nodes)
    print(f"2 nodes ({rendezvous} rendezvous) vs 1 node x 2 processes: max |Δweight| = {diff:.3g}")
    assert diff <= 1e-6, diff  # the same ranks, batches and reductions: equal up to reduction order at most
