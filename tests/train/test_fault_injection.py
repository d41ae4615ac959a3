"""Faults injected into real processes: SIGKILL of a rank under torchrun, kills during checkpoint writes."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from partial_fc.train import checkpoint as ckpt

from tests.helpers.e2e import REPO, TINY_DATA, losses_by_step, metrics, run_train, train_command

HERE = Path(__file__).resolve().parent
COMMON = ["trainer.max_steps=30", "trainer.checkpoint_every=10", "trainer.log_every=1",
          "trainer.deterministic=true", "trainer.val_every=0", "trainer.progress_bar=false",
          "data.val_bins=[]", "run_name=k"]


def _worker_pid(rank: int, restart: int, marker: str):
    """PID of this job's torchrun worker (its command line holds ``marker``) with this RANK in
    this restart round, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # only workers carry RANK (the torchrun agent does not)
        if (marker.encode() in cmdline and f"RANK={rank}".encode() in environ
                and f"TORCHELASTIC_RESTART_COUNT={restart}".encode() in environ):
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_sigkill_of_a_rank_restarts_resumes_and_matches_an_uninterrupted_run(tmp_path):
    cache = tmp_path / "cache"
    run_train(2, [*COMMON, f"output_root={tmp_path / 'ref'}"], cache)
    reference = losses_by_step(tmp_path / "ref" / "k")

    env = dict(os.environ, OMP_NUM_THREADS="1", PFC_DATA_CACHE=str(cache), PYTHONUNBUFFERED="1")
    cmd = train_command(2, [*TINY_DATA, *COMMON, f"output_root={tmp_path / 'kill'}"], max_restarts=1)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "kill" / "k"
    killed = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            steps = losses_by_step(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
            if steps and max(steps) >= 14:
                killed = _worker_pid(1, restart=0, marker=f"output_root={tmp_path / 'kill'}")
                if killed:
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "the run ended before the kill"
    if proc.returncode != 0:
        (tmp_path / "torchrun-output.log").write_text(out)  # for a post-mortem
    assert proc.returncode == 0, out[-5000:]
    records = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 31)), "one record per step"
    assert losses_by_step(run_dir) == reference
    assert ckpt.find_latest(run_dir / "checkpoints").name == "step_00000030"


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=str(HERE))
    for attempt in range(4):
        root = tmp_path / f"try{attempt}"
        proc = subprocess.Popen([sys.executable, str(HERE / "checkpoint_writer_loop.py"), str(root)],
                                env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        latest = ckpt.find_latest(root)
        assert latest is not None
        pointer = (root / "latest").read_text().strip()
        assert pointer == latest.name, "latest names a complete checkpoint"
        step = int(latest.name.split("_")[1])
        main = ckpt.load(latest / "trainer.pt")
        assert main["step"] == step and float(main["payload"][0]) == step
        shard = ckpt.load(latest / "shard_00000.pt")
        assert float(shard["rows"]["weight"][0, 0]) == step
        assert ckpt.load(latest / "backbone.pt")["b"].shape == (2_000_000,)
