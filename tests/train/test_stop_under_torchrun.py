"""Preemption as Slurm does it, under a real torchrun: SIGTERM to every process of the job.

With trainer.stop_signal=SIGTERM the ranks treat it as a stop request: torchrun's agent passes the
signal on and waits (30 s) before killing; meanwhile every rank ends the same step, writes its
checkpoint and exits, so the requeued job loses no work."""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers.e2e import REPO, TINY_DATA, train_command


@pytest.mark.slow
def test_sigterm_to_the_whole_torchrun_job_checkpoints_the_step_in_progress(tmp_path):
    run_dir = tmp_path / "out" / "r"
    overrides = [*TINY_DATA, "trainer.max_steps=2000", "trainer.checkpoint_every=1000",
                 "trainer.log_every=1", "trainer.val_every=0", "trainer.progress_bar=false",
                 "trainer.stop_signal=SIGTERM", "trainer.stop_poll_s=0",
                 f"output_root={tmp_path / 'out'}", "run_name=r"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PFC_DATA_CACHE=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(train_command(2, overrides), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        trained = False
        while time.monotonic() < deadline and proc.poll() is None and not trained:
            trained = metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= 3
            time.sleep(0.1)
        assert trained and proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
        os.killpg(proc.pid, signal.SIGTERM)  # slurmstepd signals every process of the step
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = (tmp_path / "log.txt").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_request"] and 3 <= summary["steps"] < 2000, output[-4000:]
    stopped_at = summary["steps"]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
