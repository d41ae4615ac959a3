"""launch/slurm: the per-node torchrun command, the requeue trap, and the sbatch script training
on CPU across two "nodes" of this machine.

Slurm itself cannot run here: `srun` and `scontrol` are stand-ins (tests/cluster/standins) that
start one agent per node locally with the variables a real srun sets, and record requeue calls.
Everything else (the sbatch script, torchrun_cmd.sh, requeue.sh, torchrun's c10d rendezvous, the
training) is the real thing.
"""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_harness import REPO, SLURM_DIR, ScriptRun, free_port, launcher_env

TORCHRUN_CMD = SLURM_DIR / "torchrun_cmd.sh"
SBATCH = SLURM_DIR / "train.sbatch"
REQUEUE = SLURM_DIR / "requeue.sh"


def _dry_run(env_extra, *overrides):
    env = launcher_env(dict(PFC_DRY_RUN="1", **env_extra))
    out = subprocess.run(["bash", str(TORCHRUN_CMD), *overrides], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def _flags(argv):
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("node", [0, 1])
def test_torchrun_command_of_each_node(node):
    argv = _dry_run(dict(PFC_RDZV_HOST="10.1.2.3", PFC_RDZV_PORT="23456", SLURM_JOB_ID="777",
                         SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8", SLURM_NODEID=str(node)),
                    "model=r100", "trainer.resume=none")
    flags = _flags(argv)
    assert flags["--nnodes"] == "4" and flags["--nproc-per-node"] == "8"
    assert flags["--rdzv-backend"] == "c10d"
    assert flags["--rdzv-endpoint"] == "10.1.2.3:23456"
    assert flags["--rdzv-id"] == "777"
    conf = dict(kv.split("=") for kv in flags["--rdzv-conf"].split(","))
    assert conf["is_host"] == ("1" if node == 0 else "0")  # only node 0 hosts the store
    script = argv.index(str(REPO / "launch" / "train.py"))
    # resume=auto first, so the user's own later override wins in Hydra
    assert argv[script + 1:] == ["trainer.resume=auto", "model=r100", "trainer.resume=none"]


def test_torchrun_command_needs_the_rendezvous_host():
    env = launcher_env({"PFC_DRY_RUN": "1"})
    out = subprocess.run(["bash", str(TORCHRUN_CMD)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and "PFC_RDZV_HOST" in out.stderr


def test_sbatch_asks_for_the_requeue_signal_and_one_agent_per_node():
    directives = dict(
        (m.group(1), m.group(2))
        for m in re.finditer(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M))
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"])  # to the batch shell, where the trap is
    assert "requeue" in directives and directives["open-mode"] == "append"
    assert directives["ntasks-per-node"] == "1"
    for script in (SBATCH, TORCHRUN_CMD, REQUEUE):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script}: {check.stderr}"


# ------------------------------------------------------------------ requeue.sh with real signals
_STEP = """
source {requeue}
pfc_install_requeue_trap
pfc_run_step bash -c 'touch {dir}/started; while [ ! -e {dir}/go ]; do sleep 0.05; done; exit 7'
echo "step status $? requeued=$PFC_REQUEUED"
"""


def _run_step(tmp_path, send_usr1, **env_extra):
    log = tmp_path / "scontrol.log"
    env = launcher_env(dict(STANDIN_SCONTROL_LOG=str(log), SLURM_JOB_ID="4242", **env_extra))
    run = ScriptRun(["bash", "-c", _STEP.format(requeue=REQUEUE, dir=tmp_path)], env, tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started").exists(), run.tail()
        if send_usr1:
            run.signal(signal.SIGUSR1)
            assert run.wait_for("SIGUSR1", 10), run.tail()
        (tmp_path / "go").touch()
        rc = run.finish(timeout=30)
    finally:
        run.finish(timeout=0)
    assert rc == 0, run.tail()
    calls = log.read_text().splitlines() if log.exists() else []
    return run.output, calls


def test_usr1_requeues_the_job_and_the_step_keeps_its_status(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=True, SLURM_RESTART_COUNT="2")
    assert calls == ["requeue 4242"]
    assert "step status 7 requeued=1" in output  # the step ran on and its own status came back
    assert "restart 3 of at most 20" in output


def test_no_requeue_past_the_limit(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=True, SLURM_RESTART_COUNT="5", PFC_MAX_REQUEUES="5")
    assert calls == []
    assert "step status 7 requeued=0" in output and "not requeueing" in output


def test_no_signal_no_requeue(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=False)
    assert calls == [] and "step status 7 requeued=0" in output


# ------------------------------------------------------------------ two nodes, end to end
def _tiny_run(tmp_path):
    return [
        "data=synthetic", "model=tiny", "head=npcface", "trainer=cpu",
        "trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.log_every=4",
        "trainer.val_every=0",
        "trainer.progress_bar=false", "trainer.threads=1", "trainer.collective_timeout_s=60",
        "data.synthetic.num_identities=40", "data.synthetic.images_per_identity=8",
        "data.synthetic.num_heldout_identities=10", "data.synthetic.num_pairs=40",
        "data.batch_size=16", "data.num_workers=0",
        f"output_root={tmp_path / 'outputs'}", "run_name=two-nodes",
    ]


def _metrics_records(run_dir: Path):
    """(step, "train" | "val") of each metrics.jsonl record, in file order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return [(r["step"], "train" if "loss" in r else "val") for r in records]


def _snapshot(folder: Path):
    """{file name: (size, mtime_ns)} of a checkpoint folder."""
    return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.glob("*"))}


@pytest.mark.slow
def test_sbatch_trains_on_two_nodes_and_a_requeued_job_resumes(tmp_path):
    """train.sbatch under stand-in srun: two torchrun agents (--nnodes=2 --nproc-per-node=1) meet
    at a c10d rendezvous on 127.0.0.1 and train on CPU. The first start stops after step 4
    (trainer.stop_at, as a preemption would) and gets the time-limit SIGUSR1 while it runs, which
    requeues the job; the second start, same job id, resumes from the step-4 checkpoint and finishes."""
    port = free_port()
    scontrol_log = tmp_path / "scontrol.log"
    env = launcher_env(dict(
        SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
        SLURM_SUBMIT_DIR=str(REPO), PFC_RDZV_PORT=str(port), PFC_NPROC_PER_NODE="1",
        PFC_JOIN_TIMEOUT="60", PFC_DATA_CACHE=str(tmp_path / "data"), OMP_NUM_THREADS="1",
        STANDIN_SCONTROL_LOG=str(scontrol_log)))
    run_dir = tmp_path / "outputs" / "two-nodes"

    first = ScriptRun(["bash", str(SBATCH), *_tiny_run(tmp_path), "trainer.stop_at=4"], env, tmp_path)
    try:
        assert first.wait_for("[srun stand-in] node 1/2", 30), first.tail()
        first.signal(signal.SIGUSR1)  # the time-limit warning, while the step runs
        rc = first.finish(timeout=120)
    finally:
        first.finish(timeout=0)
    assert rc == 0, first.tail()
    out = first.output
    for node in (0, 1):  # one agent per node, both pointed at node 0's rendezvous on 127.0.0.1
        assert re.search(rf"\[pfc node {node}/2 on .*--rdzv-backend=c10d "
                         rf"--rdzv-endpoint=127\.0\.0\.1:{port} --rdzv-id=4242 "
                         rf"--rdzv-conf=is_host={int(node == 0)},", out), out
    assert scontrol_log.read_text().splitlines() == ["show hostnames 127.0.0.1,127.0.0.1",
                                                     "requeue 4242"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    assert summary["launcher"] == "torchrun"
    step4 = run_dir / "checkpoints" / "step_00000004"
    written = _snapshot(step4)
    assert written, f"no step-4 checkpoint in {run_dir / 'checkpoints'}"

    env["SLURM_RESTART_COUNT"] = "1"
    second = ScriptRun(["bash", str(SBATCH), *_tiny_run(tmp_path)], env, tmp_path)
    try:
        rc = second.finish(timeout=120)
    finally:
        second.finish(timeout=0)
    assert rc == 0, second.tail()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 2
    # Resumed, not restarted: steps 1-4 were not trained again (their checkpoint is untouched),
    # and the log has one step-0 validation (a start from step 0 validates there again).
    assert _snapshot(step4) == written
    assert _metrics_records(run_dir) == [(0, "val"), (4, "train"), (4, "val"),
                                         (8, "train"), (8, "val")]
