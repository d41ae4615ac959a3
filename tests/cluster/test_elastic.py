"""Elastic membership as torchrun does it: two agents on 127.0.0.1 started by
``launch/slurm/torchrun_cmd.sh`` with ``PFC_NNODES=1:2`` (``--nnodes=1:2``, a c10d rendezvous,
``--max-restarts``), sharing one run directory as nodes on a shared file system do.

A node killed (agent and workers) after a checkpoint: the other restarts alone, re-shards from
2 ranks to 1 and finishes from the newest complete checkpoint, bit for bit as a direct 1-rank resume
from it. A node that arrives while one trains: it is admitted at a restart of the running one
(with ``trainer.stop_signal=SIGTERM`` that restart checkpoints the step in progress first), the
two finish on 2 ranks, bit for bit as a direct 2-rank resume. The node that hosts the rendezvous
store cannot be lost: the others end at once, and a rerun resumes. Every run is bounded in time.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import psutil
import pytest
import torch

from partial_fc.train import checkpoint as ckpt

from tests.helpers.e2e import TINY_DATA, losses_by_step, metrics, run_train
from tests.helpers.slurm_harness import REPO, SLURM_DIR, free_port, launcher_env

STEPS = 60
COMMON = [*TINY_DATA, "trainer.log_every=1", "trainer.val_every=0", "data.val_bins=[]",
          "trainer.progress_bar=false", "trainer.threads=1", "trainer.deterministic=true",
          "trainer.keep_checkpoints=1000", "trainer.init_timeout_s=60", "trainer.collective_timeout_s=60"]
RESUMED = re.compile(r"resumed from (\S+) at step (\d+) \((re-sharded to (\d+) ranks|same) layout\)")


class Agent:
    """One node: ``torchrun_cmd.sh`` in its own session, its output in ``log``."""

    def __init__(self, tmp_path: Path, node: int, port: int, overrides: List[str]):
        self.log = tmp_path / f"node{node}.log"
        env = launcher_env(dict(PFC_RDZV_HOST="127.0.0.1", PFC_RDZV_PORT=str(port), PFC_RDZV_ID="elastic",
                                PFC_NODE_RANK=str(node), PFC_NNODES="1:2", PFC_NPROC_PER_NODE="1",
                                PFC_MAX_RESTARTS="3", PFC_JOIN_TIMEOUT="60", PFC_LAST_CALL_TIMEOUT="2",
                                PFC_DATA_CACHE=str(tmp_path / "data"), OMP_NUM_THREADS="1",
                                PYTHONUNBUFFERED="1"))
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["bash", str(SLURM_DIR / "torchrun_cmd.sh"), *COMMON, *overrides],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_node(self) -> None:
        """SIGKILL to the agent and its workers at once, as when the node goes away."""
        workers = psutil.Process(self.proc.pid).children(recursive=True)
        for proc in [psutil.Process(self.proc.pid), *workers]:
            proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, deadline: float) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return -9

    @property
    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def agents():
    started: List[Agent] = []
    yield started
    for agent in started:  # whatever a failed test left running
        if agent.proc.poll() is None:
            os.killpg(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _state(path: Path):
    """Every file of a checkpoint, loaded (``MANIFEST.json`` as text)."""
    return {f.name: f.read_text() if f.suffix == ".json" else ckpt.load(f) for f in sorted(path.iterdir())}


def _assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _direct_resume(tmp_path: Path, nproc: int, checkpoint: Path, steps: int, *extra: str) -> Path:
    run_dir = tmp_path / "direct"
    run_train(nproc, [*COMMON, f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}",
                      f"trainer.resume={checkpoint}", *extra], tmp_path / "data")
    return run_dir


@pytest.mark.slow
def test_a_node_killed_after_a_checkpoint_leaves_the_other_to_finish_alone_exactly_as_a_direct_resume(
        tmp_path, agents):
    run_dir = tmp_path / "run"
    overrides = [f"hydra.run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=10"]
    port = free_port()
    start = time.monotonic()
    agents.append(Agent(tmp_path, 0, port, overrides))  # node 0 hosts the rendezvous store
    agents.append(Agent(tmp_path, 1, port, overrides))
    _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 150, "the first checkpoint")
    agents[1].kill_node()
    deadline = start + 240
    assert agents[0].wait(deadline) == 0, agents[0].output[-5000:]

    out = agents[0].output
    (resumed, step, _, ranks), = RESUMED.findall(out)
    assert ranks == "1" and 10 <= int(step) < STEPS and int(step) % 10 == 0, out[-3000:]
    assert "failed (exitcode: 1)" in out  # the survivor's worker lost its peer: a restart, not a clean exit
    records = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert records == list(range(1, STEPS + 1)), "one record per step, the lost ones trained again"

    direct = _direct_resume(tmp_path, 0, Path(resumed), STEPS)
    last = ckpt.step_dir_name(STEPS)
    _assert_equal(_state(run_dir / "checkpoints" / last), _state(direct / "checkpoints" / last))
    elastic_losses = losses_by_step(run_dir)
    assert {s: elastic_losses[s] for s in losses_by_step(direct)} == losses_by_step(direct)


def test_the_node_hosting_the_rendezvous_cannot_be_lost_the_others_end_at_once_and_a_rerun_resumes(
        tmp_path, agents):
    run_dir = tmp_path / "run"
    overrides = [f"hydra.run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=10"]
    port = free_port()
    agents.append(Agent(tmp_path, 0, port, overrides))
    agents.append(Agent(tmp_path, 1, port, overrides))
    _wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 150, "the first checkpoint")
    agents[0].kill_node()
    start = time.monotonic()
    assert agents[1].wait(start + 120) == 1
    assert time.monotonic() - start < 60  # not the join timeout: the store is gone
    assert "RendezvousConnectionError: The connection to the C10d store has failed" in agents[1].output
    latest = ckpt.find_latest(run_dir / "checkpoints")
    assert latest is not None  # what a rerun (trainer.resume=auto, the batch job's requeue) starts from


@pytest.mark.slow
def test_a_node_that_arrives_is_admitted_at_a_restart_and_with_sigterm_as_stop_signal_nothing_is_lost(
        tmp_path, agents):
    run_dir = tmp_path / "run"
    steps = 200
    overrides = [f"hydra.run.dir={run_dir}", f"trainer.max_steps={steps}", "trainer.checkpoint_every=1000",
                 "trainer.stop_signal=SIGTERM"]
    port = free_port()
    start = time.monotonic()
    agents.append(Agent(tmp_path, 0, port, overrides))
    _wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 150, "node 0 training alone")
    agents.append(Agent(tmp_path, 1, port, overrides))
    deadline = start + 240
    codes = [agent.wait(deadline) for agent in agents]
    assert codes == [0, 0], "\n".join(a.output[-3000:] for a in agents)

    out = agents[0].output
    stopped = re.search(r"checkpoint of step (\d+) written; stopping", out)
    assert stopped, out[-3000:]
    (resumed, step, _, ranks), = RESUMED.findall(out)
    assert step == stopped.group(1) and ranks == "2" and int(step) < steps  # the join cost no step
    records = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert records == list(range(1, steps + 1))
    assert ckpt.find_latest(run_dir / "checkpoints").name == ckpt.step_dir_name(steps)

    direct = _direct_resume(tmp_path, 2, Path(resumed), steps, "trainer.stop_signal=SIGTERM")
    last = ckpt.step_dir_name(steps)
    _assert_equal(_state(run_dir / "checkpoints" / last), _state(direct / "checkpoints" / last))


def test_an_elastic_node_command_restarts_and_does_not_share_the_rendezvous_store():
    env = launcher_env(dict(PFC_DRY_RUN="1", PFC_RDZV_HOST="h", PFC_NNODES="2:4", PFC_LAST_CALL_TIMEOUT="5"))
    out = subprocess.run(["bash", str(SLURM_DIR / "torchrun_cmd.sh")], env=env, capture_output=True, text=True,
                         timeout=30, check=True)
    argv = shlex.split(out.stdout)
    assert argv[:2] == ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]
    flags = dict(a.split("=", 1) for a in argv if a.startswith("--"))
    assert flags["--nnodes"] == "2:4" and flags["--max-restarts"] == "3"
    assert flags["--rdzv-conf"].split(",")[1:] == ["join_timeout=900", "last_call_timeout=5"]
    fixed = launcher_env(dict(PFC_DRY_RUN="1", PFC_RDZV_HOST="h", PFC_NNODES="2"))
    argv = shlex.split(subprocess.run(["bash", str(SLURM_DIR / "torchrun_cmd.sh")], env=fixed, capture_output=True,
                                      text=True, timeout=30, check=True).stdout)
    assert argv[0] != "env" and "--max-restarts=0" in argv


def test_an_elastic_batch_job_starts_an_agent_on_every_node_and_survives_a_node_failure(tmp_path):
    """train.sbatch with PFC_NNODES=1:2: srun gets the largest node count and --no-kill (one
    failing node does not end the step) instead of --kill-on-bad-exit=1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "srun").chmod(0o755)
    calls = {}
    for nnodes in ("1:2", "2"):
        env = launcher_env(dict(PFC_NNODES=nnodes, PFC_RDZV_HOST="127.0.0.1", SLURM_JOB_ID="77",
                                SLURM_SUBMIT_DIR=str(REPO), SRUN_ARGS=str(tmp_path / f"srun-{nnodes}"),
                                PFC_STOP_FILE=str(tmp_path / "stop")))
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        subprocess.run(["bash", str(SLURM_DIR / "train.sbatch")], env=env, capture_output=True, text=True,
                       timeout=60, check=True)
        calls[nnodes] = (tmp_path / f"srun-{nnodes}").read_text().splitlines()
    elastic, fixed = calls["1:2"], calls["2"]
    assert "--nodes=2" in elastic and "--ntasks=2" in elastic
    assert "--no-kill" in elastic and "--kill-on-bad-exit=0" in elastic and "--kill-on-bad-exit=1" not in elastic
    assert "--nodes=2" in fixed and "--kill-on-bad-exit=1" in fixed and "--no-kill" not in fixed
