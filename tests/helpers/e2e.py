"""Helpers to run launch/train.py for real (torchrun, gloo) on a tiny synthetic set."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")

TINY_DATA = [
    "data.synthetic.num_identities=24",
    "data.synthetic.images_per_identity=8",
    "data.synthetic.num_heldout_identities=8",
    "data.synthetic.num_pairs=40",
    "data.synthetic.family_size=4",
    "data.batch_size=8",
    "data.num_workers=0",
]


def train_command(nproc: int, overrides, max_restarts: int = 0):
    flags = [a for a in overrides if a.startswith("-")]  # e.g. Hydra's -m goes before the overrides
    overrides = flags + [a for a in overrides if not a.startswith("-")]
    if nproc == 0:
        return [sys.executable, str(REPO / "launch" / "train.py"), *overrides]
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
            str(REPO / "launch" / "train.py"), *overrides]


def run_train(nproc: int, overrides, cache_dir: Path, timeout: float = 240, max_restarts: int = 0,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run a training job to completion; raise with its output if it fails (when ``check``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PFC_DATA_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.run(train_command(nproc, [*TINY_DATA, *overrides], max_restarts), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def metrics(run_dir: Path):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses_by_step(run_dir: Path):
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def wait_agents(procs, logs, timeout: float):
    """Wait for ``procs`` (each in its own session, writing to the open file of ``logs``) for at
    most ``timeout`` seconds in all; returns ``[(returncode, output)]``, -9 for one killed at the
    deadline (with its session)."""
    deadline = time.monotonic() + timeout
    results = []
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        results.append((proc.returncode, log.read()))
        log.close()
    return results
