"""Two torchrun agents on 127.0.0.1 stand in for two nodes (c10d rendezvous, a free port), each
with its own run directory as on nodes that write to local disks. Every run is bounded in time:
a hang fails the test instead of stalling the suite."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import List, Sequence

import pytest

from tests.helpers.dist_harness import free_port
from tests.helpers.e2e import REPO, TINY_DATA, TORCHRUN, losses_by_step, wait_agents

STEPS = 3
COMMON = [*TINY_DATA, f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.val_every=0",
          "trainer.checkpoint_every=1000", "trainer.progress_bar=false", "trainer.threads=1",
          "trainer.deterministic=true", "trainer.init_timeout_s=60", "trainer.collective_timeout_s=60"]


def _env(cache: Path):
    return dict(os.environ, OMP_NUM_THREADS="1", PFC_DATA_CACHE=str(cache), PYTHONUNBUFFERED="1")


def _agent(nnodes: int, nproc: int, port: int, run_id: str, overrides: Sequence[str]) -> List[str]:
    return [str(TORCHRUN), f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}", "--max-restarts=0",
            "--rdzv_conf=join_timeout=60", str(REPO / "launch" / "train.py"), *COMMON, *overrides]


def run_nodes(tmp_path: Path, per_node: Sequence[Sequence[str]], nproc: int = 1, timeout: float = 240):
    """Start one agent per entry of ``per_node`` (its extra overrides) and wait for all; returns
    ``[(returncode, output)]``. Agents still running at ``timeout`` are killed and reported as -9."""
    port = free_port()
    procs, logs = [], []
    for n, extra in enumerate(per_node):
        log = open(tmp_path / f"node{n}.log", "w+")
        procs.append(subprocess.Popen(_agent(len(per_node), nproc, port, "job1", extra), cwd=REPO,
                                      env=_env(tmp_path / "data"), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        logs.append(log)
    return wait_agents(procs, logs, timeout)


def node_dir(tmp_path: Path, n: int) -> Path:
    return tmp_path / f"node{n}" / "run"


def node_overrides(tmp_path: Path, n: int, *extra: str) -> List[str]:
    """Per-node run directory and data cache, as on nodes with local disks."""
    return [f"hydra.run.dir={node_dir(tmp_path, n)}", f"data.cache_dir={tmp_path / f'node{n}' / 'data'}", *extra]


def assert_all_ok(results):
    for n, (code, out) in enumerate(results):
        assert code == 0, f"node {n} exited {code}:\n{out[-4000:]}"


@pytest.mark.slow
def test_per_node_run_directories_train_checkpoint_and_resume(tmp_path):
    results = run_nodes(tmp_path, [node_overrides(tmp_path, n, "trainer.checkpoint_every=2") for n in (0, 1)])
    assert_all_ok(results)
    assert sorted(losses_by_step(node_dir(tmp_path, 0))) == list(range(1, STEPS + 1))
    assert not (node_dir(tmp_path, 1) / "metrics.jsonl").exists()  # rank 0 writes the logs
    last = f"step_{STEPS:08d}"
    for n in (0, 1):  # each node completed its own copy of the checkpoint with its rank's shard
        ckpt = node_dir(tmp_path, n) / "checkpoints" / last
        assert (ckpt / "MANIFEST.json").is_file() and (ckpt / f"shard_{n:05d}.pt").is_file()
        assert (node_dir(tmp_path, n) / "checkpoints" / "latest").read_text().strip() == last
    assert not (node_dir(tmp_path, 1) / "checkpoints" / last / "trainer.pt").exists()

    # Resume: node 1 has only its shard; rank 0 sends it the trainer state.
    more = STEPS + 1
    assert_all_ok(run_nodes(tmp_path, [node_overrides(tmp_path, n, f"trainer.max_steps={more}")
                                       for n in (0, 1)]))
    assert sorted(losses_by_step(node_dir(tmp_path, 0))) == list(range(1, more + 1))

    # A node that lost its shard fails the resume at once, naming the file, on every rank.
    missing = node_dir(tmp_path, 1) / "checkpoints" / f"step_{more:08d}" / "shard_00001.pt"
    missing.unlink()
    results = run_nodes(tmp_path, [node_overrides(tmp_path, n, f"trainer.max_steps={more + 1}")
                                   for n in (0, 1)], timeout=150)
    for code, out in results:
        assert code != 0 and "train.py: error: " in out and f"rank 1 needs {missing}" in out, out[-4000:]
    assert sorted(losses_by_step(node_dir(tmp_path, 0))) == list(range(1, more + 1))  # nothing trained


def test_a_node_started_with_another_override_fails_fast_naming_the_key(tmp_path):
    start = time.monotonic()
    results = run_nodes(tmp_path, [node_overrides(tmp_path, 0), node_overrides(tmp_path, 1, "head.s=32")],
                        timeout=150)
    for n, (code, out) in enumerate(results):
        assert code != 0, out[-4000:]
        assert "head.s differs: rank 0 has 64, rank 1 has 32" in out, out[-4000:]
        assert not node_dir(tmp_path, n).exists() or not any(node_dir(tmp_path, n).iterdir())
    # far below the 60-s collective and init timeouts: nothing waited for a peer
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_two_nodes_of_two_ranks_log_the_losses_of_one_node_of_four(tmp_path):
    results = run_nodes(tmp_path, [node_overrides(tmp_path, n) for n in (0, 1)], nproc=2)
    assert_all_ok(results)
    single = tmp_path / "single"
    (tmp_path / "one").mkdir()
    code, out = run_nodes(tmp_path / "one", [[f"hydra.run.dir={single}",
                                              f"data.cache_dir={tmp_path / 'node0' / 'data'}"]], nproc=4)[0]
    assert code == 0, out[-4000:]
    two_nodes, one_node = losses_by_step(node_dir(tmp_path, 0)), losses_by_step(single)
    assert sorted(one_node) == list(range(1, STEPS + 1))
    assert two_nodes == one_node
