"""Helpers for tests that start `perceivers` under torchrun: environment, free ports, launching, comparing
checkpoints."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
PERCEIVERS = ["-m", "perceivers.cli"]


def env() -> dict[str, str]:
    """One thread per process (two processes share two cores), this folder importable (test callbacks), and
    Python's fault handler on: a process killed by a signal prints every thread's stack."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join([str(HERE), out.get("PYTHONPATH", "")])
    out["OMP_NUM_THREADS"] = "1"
    out["PYTHONFAULTHANDLER"] = "1"
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        out.pop(key, None)  # left by an in-process run; torchrun sets its own
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh(run: Path) -> Callable[[], None]:
    """A ``prepare`` for :func:`run_standalone`: remove what an earlier attempt left in ``run``."""
    return lambda: shutil.rmtree(run, ignore_errors=True)


def killed_by_signal(out: subprocess.CompletedProcess) -> int | None:
    """The signal that killed the first worker to fail in a torchrun launch, else None (the agent logs
    ``failed (exitcode: -6) local_rank: 0``; workers it stops after that one are not counted)."""
    found = re.search(r"failed \(exitcode: -(\d+)\) local_rank", out.stderr) if out.returncode else None
    return int(found.group(1)) if found else None


def failure(out: subprocess.CompletedProcess, limit: int = 6000) -> str:
    """What a failed launch printed, for an assertion message: each process's first error lines and fault-handler
    stacks (torchrun prints the last failure's traceback, often a peer's lost connection), then the end."""
    keep = re.compile(r"^(\[rank\d+\]:.*(Error|error|Exception)|Fatal Python error|Thread 0x|Current thread|"
                      r"  File |terminate called|  what\(\))")
    firsts = "\n".join([line for line in out.stderr.splitlines() if keep.match(line)][:80])
    return f"{firsts[:limit // 2]}\n...\n{out.stderr[-limit // 2:]}"


def run_standalone(args: list[str], nproc: int = 2, timeout: float = 300,
                   prepare: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m perceivers.cli *args``, after ``prepare()`` (which sets
    up the run's files).

    A launch in which a process was killed by a signal runs once more (``prepare()`` again first), with a
    warning that carries the first attempt's output: in one of 25 CI runs a rank aborted (SIGABRT, its output
    lost) while its peer waited on a gloo collective, and it did not recur in 28 local launches (some beside a
    CPU load). Every other failure, and a second signal, is returned as it is.
    """
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), *PERCEIVERS, *args]

    def launch() -> subprocess.CompletedProcess:
        if prepare is not None:
            prepare()
        return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout, check=False)

    out = launch()
    signal_number = killed_by_signal(out)
    if signal_number is None:
        return out
    warnings.warn(f"torchrun: a process was killed by signal {signal_number}; launching once more. First attempt:\n"
                  f"{failure(out)}", stacklevel=2)
    return launch()


def run_nodes(launch: list[list[str]], args: list[str], logs: Path, timeout: float = 300) -> list[int]:
    """Start one torchrun per entry of ``launch`` (its own launcher options) at once, all running
    ``perceivers.cli *args``; wait for all. Output goes to ``logs/node<i>.log``. Returns the exit codes;
    on a timeout every launcher's process group is killed (it may wait for a peer that died)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, options in enumerate(launch):
        with (logs / f"node{i}.log").open("w") as log:
            procs.append(subprocess.Popen([*TORCHRUN, *options, *PERCEIVERS, *args], env=env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        return [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def max_weight_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between the ``state_dict`` tensors of two checkpoints (same keys)."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    return max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])


def max_optimizer_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between the optimizer states of two checkpoints, which must have the same
    layout (``Optimizer.state_dict()``: state keyed by position in the parameter groups)."""
    (sa,), (sb,) = a["optimizer_states"], b["optimizer_states"]
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    assert sa["state"].keys() == sb["state"].keys()
    worst = 0.0
    for key, state in sa["state"].items():
        assert state.keys() == sb["state"][key].keys()
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                worst = max(worst, (value.float() - sb["state"][key][name].float()).abs().max().item())
    return worst
