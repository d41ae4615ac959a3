"""launch/slurm under a real Slurm 22.05: one node (this machine, all its CPUs, no GPUs, no GRES)
with its own munged, slurmctld and slurmd (tests/helpers/real_slurm.py).

Covered: `sbatch launch/slurm/train.sbatch` on a CPU node as submitted by a user (no GPU or CPU
options, output in logs/); `scancel --signal=USR1` and `--signal=TERM` to every process of the
step, DataLoader workers included (both ranks checkpoint the step in progress, the step exits 0,
the batch script requeues); a real `--time` limit whose `--signal=B:USR1` checkpoints, requeues
and resumes without redoing a step; plain `srun --ntasks=2 python launch/train.py`.
Skipped, with the reason, where Slurm and munge are not installed or the tests do not run as root.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.real_slurm import SlurmCluster, unavailable
from tests.helpers.slurm_harness import REPO, SLURM_DIR

SBATCH = SLURM_DIR / "train.sbatch"
_WHY = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="pfc-slurm-", dir="/tmp"))
    slurm = SlurmCluster(root)
    try:
        yield slurm.start()
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


def _tiny(out: Path, run_name: str, *extra: str):
    return ["data=synthetic", "model=tiny", "head=npcface", "trainer=cpu", "trainer.threads=1",
            "trainer.max_steps=100000", "trainer.checkpoint_every=100000", "trainer.log_every=1",
            "trainer.val_every=0", "trainer.collective_timeout_s=60",
            "data.synthetic.num_identities=24", "data.synthetic.images_per_identity=8",
            "data.synthetic.num_heldout_identities=8", "data.synthetic.num_pairs=40",
            "data.batch_size=8", f"output_root={out}", f"run_name={run_name}", *extra]


def _env(cluster, tmp_path, **extra):
    return cluster.env(dict(PFC_DATA_CACHE=str(cluster.root / "data"), PFC_JOIN_TIMEOUT="60",
                            PFC_STOP_FILE=str(tmp_path / "stop" / "request"), **extra))


def _sbatch(cluster, env, options, overrides) -> str:
    res = cluster.run(["sbatch", "--parsable", *options, str(SBATCH), *overrides], env=env, cwd=REPO)
    return res.stdout.strip().split(";")[0]


def _trained_steps(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def _wait_training(cluster, job, run_dir, steps, timeout=150.0):
    deadline = time.monotonic() + timeout
    while len(_trained_steps(run_dir)) < steps:
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state}:\n{cluster.logs()}"
        assert time.monotonic() < deadline, f"job {job} did not train {steps} steps:\n{cluster.logs()}"
        time.sleep(0.2)


def _wait_restarts(cluster, job, restarts, timeout):
    """Until the job has been requeued ``restarts`` times (or ended); its fields."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job(job)
        if int(info.get("Restarts", 0)) >= restarts or info["JobState"] in ("COMPLETED", "FAILED",
                                                                             "CANCELLED", "TIMEOUT"):
            return info
        assert time.monotonic() < deadline, f"job {job} not requeued: {info}\n{cluster.logs()}"
        time.sleep(0.5)


def _checkpointed_stop(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["steps"]
    assert summary["stopped_by_request"] and step >= 1, summary
    assert (run_dir / "checkpoints" / f"step_{step:08d}").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    return summary


@pytest.mark.parametrize("stop_signal", ["SIGUSR1", "SIGTERM"])
def test_scancel_signal_to_every_process_checkpoints_and_requeues(cluster, tmp_path, stop_signal):
    """As a user submits it (no GPU, CPU or output options): two ranks with two DataLoader
    workers each; `scancel --signal=<sig> <job>` signals every process of the step (agent, ranks,
    workers). The ranks checkpoint the step in progress, the step ends with status 0, the batch
    script requeues the job. (The requeued start is then cancelled: resuming is the next test's.)"""
    run_dir = tmp_path / "out" / "r"
    env = _env(cluster, tmp_path, PFC_NPROC_PER_NODE="2", PFC_MAX_REQUEUES="1")
    job = _sbatch(cluster, env, [], _tiny(tmp_path / "out", "r", "data.num_workers=2",
                                          f"trainer.stop_signal={stop_signal}"))
    log = REPO / "logs" / f"slurm-pfc-train-{job}.out"  # the template's default output
    try:
        _wait_training(cluster, job, run_dir, steps=3)
        cluster.run(["scancel", f"--signal={stop_signal[3:]}", job])
        _wait_restarts(cluster, job, 1, timeout=120)
        cluster.run(["scancel", job])
        output = log.read_text()
    finally:
        log.unlink(missing_ok=True)
    assert "worker(s) (0 GPU(s), " in output and "2 worker(s)" in output, output
    summary = _checkpointed_stop(run_dir)
    assert summary["world_size"] == 2 and summary["launcher"] == "torchrun"
    assert "killed by signal" not in output and "SignalException" not in output, output[-3000:]
    assert (f"the training stopped at the checkpoint of step {summary['steps']}: requeueing job {job}"
            in output), output[-3000:]
    assert "\r" not in output  # no progress bar in a file: a line per log interval
    assert re.search(r"step \d+/100000: loss \d", output), output[-3000:]


def test_time_limit_checkpoints_requeues_and_resumes_without_redoing_a_step(cluster, tmp_path):
    """--time=1 (Slurm's minimum) with --signal=B:USR1@50: each start gets the time-limit signal,
    stops at a checkpoint and the job is requeued, until PFC_MAX_REQUEUES (1) is reached; the
    second start resumes from the first's checkpoint. Slurm holds a requeued job until the first
    start's credential has expired (AuthInfo cred_expire: 120 s by default, 10 s in the test
    cluster); releasing it earlier (scontrol update StartTime=now) makes slurmctld kill the new
    start at launch ("Job credential revoked"), so the test waits for Slurm."""
    run_dir = tmp_path / "out" / "t"
    env = _env(cluster, tmp_path, PFC_NPROC_PER_NODE="2", PFC_MAX_REQUEUES="1")
    out_file = tmp_path / "slurm.out"
    job = _sbatch(cluster, env, ["--time=1", "--signal=B:USR1@50", f"--output={out_file}"],
                  _tiny(tmp_path / "out", "t", "data.num_workers=0"))
    info = _wait_restarts(cluster, job, 1, timeout=200)
    assert int(info.get("Restarts", 0)) == 1, f"{info}\n{out_file.read_text()[-3000:]}"
    first = _checkpointed_stop(run_dir)["steps"]
    info = cluster.wait_job(job, {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}, timeout=200)
    output = out_file.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"{info}\n{output[-3000:]}\n{cluster.logs(60)}"
    second = _checkpointed_stop(run_dir)["steps"]
    assert second > first, output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{first:08d}'}" in output, output[-3000:]
    steps = _trained_steps(run_dir)
    assert steps == list(range(1, second + 1)), steps  # each step once, none redone
    assert "was requeued 1 times (PFC_MAX_REQUEUES=1); not requeueing" in output, output[-3000:]


def test_plain_srun_two_tasks_trains(cluster, tmp_path):
    """`srun --ntasks=2 python launch/train.py` without torchrun: ranks from SLURM_PROCID, the
    rendezvous on the first node at the port derived from the job id."""
    run_dir = tmp_path / "out" / "s"
    res = cluster.run(["srun", "--ntasks=2", "--time=3", sys.executable, str(REPO / "launch" / "train.py"),
                       *_tiny(tmp_path / "out", "s", "trainer.max_steps=4", "data.num_workers=0")],
                      env=_env(cluster, tmp_path), check=False, timeout=240, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2 and summary["launcher"] == "slurm"
