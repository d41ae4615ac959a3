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

from tests.helpers.slurm_harness import REPO, SLURM_DIR, ScriptRun, free_port, launcher_env

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
    # resume=auto and the stop signal first, so the user's own later override wins in Hydra
    assert argv[script + 1:] == ["trainer.resume=auto", "trainer.stop_signal=SIGUSR1", "model=r100",
                                 "trainer.resume=none"]
    assert flags["--signals-to-handle"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"  # USR1 is left alone


def test_torchrun_command_on_a_node_without_gpus_starts_one_worker():
    argv = _dry_run(dict(PFC_RDZV_HOST="h", SLURM_CPUS_ON_NODE="2"))
    assert _flags(argv)["--nproc-per-node"] == "1"
    argv = _dry_run(dict(PFC_RDZV_HOST="h", SLURM_GPUS_ON_NODE="0", PFC_NPROC_PER_NODE="3"))
    assert _flags(argv)["--nproc-per-node"] == "3"


@pytest.mark.parametrize("env_signal,args,expected,handled", [
    ({}, ["trainer.stop_signal=SIGTERM"], "SIGTERM", "SIGINT,SIGHUP,SIGQUIT"),
    ({"PFC_STOP_SIGNAL": "SIGTERM"}, [], "SIGTERM", "SIGINT,SIGHUP,SIGQUIT"),
    ({"PFC_STOP_SIGNAL": "SIGTERM"}, ["trainer.stop_signal=null"], "null", "SIGTERM,SIGINT,SIGHUP,SIGQUIT"),
])
def test_torchrun_leaves_the_stop_signal_to_the_ranks(env_signal, args, expected, handled):
    """The agent must outlive the stop signal Slurm sends every process of the step, and the
    ranks must get the same signal as the agent leaves alone (the command line's wins)."""
    argv = _dry_run(dict(PFC_RDZV_HOST="h", **env_signal), *args)
    assert _flags(argv)["--signals-to-handle"] == handled
    assert [a for a in argv if a.startswith("trainer.stop_signal=")][-1] == f"trainer.stop_signal={expected}"


def test_torchrun_command_refuses_a_stop_signal_that_is_not_a_name():
    env = launcher_env({"PFC_DRY_RUN": "1", "PFC_RDZV_HOST": "h"})
    out = subprocess.run(["bash", str(TORCHRUN_CMD), "trainer.stop_signal=15"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "got '15'" in out.stderr


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
    # Any node: no GRES or CPU count asked for (sbatch --gpus-per-node=N adds GPUs), and the
    # output in logs/ (in the repository, contents ignored), not the repository root.
    assert not {"gpus-per-node", "gres", "gpus", "cpus-per-task"} & set(directives)
    assert directives["output"].startswith("logs/") and (REPO / "logs" / ".gitignore").is_file()
    for script in (SBATCH, TORCHRUN_CMD, REQUEUE):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{script}: {check.stderr}"


# ------------------------------------------------------------------ requeue.sh with real signals
# A stand-in training step: when the stop file appears it "checkpoints" (leaves the marker) and
# stops with status 0, unless it ignores the file; otherwise it runs until `go` appears and exits
# with {status}.
_STEP = """
source {requeue}
pfc_install_requeue_trap
pfc_run_step bash -c 'touch {dir}/started
  while [ ! -e {dir}/go ]; do
    if [ "{honour}" = 1 ] && [ -n "${{PFC_STOP_FILE:-}}" ] && [ -e "$PFC_STOP_FILE" ]; then
      rm "$PFC_STOP_FILE"; echo 3 > "$PFC_STOP_FILE.stopped"; echo "checkpointed and stopped"; exit 0
    fi
    sleep 0.05
  done
  exit {status}'
rc=$?
pfc_after_step "$rc"
echo "step status $rc requeued=$PFC_REQUEUED"
"""


def _run_step(tmp_path, send_usr1, honour_stop_file=True, stop_file=True, go_after_s=0.0, status=7,
              **env_extra):
    log = tmp_path / "scontrol.log"
    env = dict(STANDIN_SCONTROL_LOG=str(log), SLURM_JOB_ID="4242", **env_extra)
    if stop_file:
        env["PFC_STOP_FILE"] = str(tmp_path / "stop" / "4242.0")
    env = launcher_env(env)
    script = _STEP.format(requeue=REQUEUE, dir=tmp_path, honour=int(honour_stop_file), status=status)
    run = ScriptRun(["bash", "-c", script], env, tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "started").exists(), run.tail()
        if send_usr1:
            run.signal(signal.SIGUSR1)
            assert run.wait_for("SIGUSR1", 10), run.tail()
        time.sleep(go_after_s)
        (tmp_path / "go").touch()
        rc = run.finish(timeout=30)
    finally:
        run.finish(timeout=0)
    assert rc == 0, run.tail()
    calls = log.read_text().splitlines() if log.exists() else []
    return run.output, calls


def _sleeping(seconds):
    """PIDs of `sleep <seconds>` processes (the watchdog's, with a grace nobody else uses)."""
    out = subprocess.run(["pgrep", "-f", f"^sleep {seconds}$"], capture_output=True, text=True)
    return out.stdout.split()


def test_usr1_asks_for_a_checkpoint_and_requeues_once_the_step_has_stopped(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=True, go_after_s=3.0, SLURM_RESTART_COUNT="2",
                              PFC_STOP_GRACE="97")
    assert calls == ["requeue 4242"]
    assert "asked the training to checkpoint and stop" in output
    # the step saw the request and stopped by itself (before `go`), then the job was requeued
    assert output.index("checkpointed and stopped") < output.index("requeueing job 4242")
    assert "stopped at the checkpoint of step 3" in output
    assert "step status 0 requeued=1" in output and "restart 3 of at most 20" in output
    assert not (tmp_path / "stop" / "4242.0").exists()
    assert not (tmp_path / "stop" / "4242.0.stopped").exists()
    assert _sleeping(97) == []  # the watchdog went with its sleep


def test_a_run_that_finishes_after_usr1_is_not_requeued(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=True, honour_stop_file=False, go_after_s=1.0,
                              status=0)
    assert calls == []
    assert "finished before it acted on the stop request; not requeueing" in output
    assert "step status 0 requeued=0" in output


def test_a_step_that_does_not_stop_is_requeued_after_the_grace_time(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=True, honour_stop_file=False, go_after_s=4.0,
                              PFC_STOP_GRACE="1")
    assert calls == ["requeue 4242"]  # once, at the deadline, while the step still ran
    assert "no checkpoint-and-stop within 1 s" in output
    assert "step status 7 requeued=1" in output  # the step ran on and its own status came back
    assert not (tmp_path / "stop" / "4242.0").exists()  # a request never seen does not linger


def test_without_a_stop_file_usr1_requeues_at_once(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=True, stop_file=False)
    assert calls == ["requeue 4242"]
    assert "step status 7 requeued=1" in output


def test_no_requeue_past_the_limit(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=True, go_after_s=3.0, SLURM_RESTART_COUNT="5",
                              PFC_MAX_REQUEUES="5")
    assert calls == []
    assert "step status 0 requeued=0" in output and "not requeueing" in output


def test_no_signal_no_requeue(tmp_path):
    output, calls = _run_step(tmp_path, send_usr1=False)
    assert calls == [] and "step status 7 requeued=0" in output


# ------------------------------------------------------------------ two nodes, end to end
def _tiny_run(tmp_path, steps):
    return [
        "data=synthetic", "model=tiny", "head=npcface", "trainer=cpu",
        f"trainer.max_steps={steps}", "trainer.checkpoint_every=20", "trainer.log_every=4",
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


@pytest.mark.slow
def test_sbatch_trains_on_two_nodes_and_a_requeued_job_resumes(tmp_path):
    """train.sbatch under stand-in srun: two torchrun agents (--nnodes=2 --nproc-per-node=1) meet
    at a c10d rendezvous on 127.0.0.1 and train on CPU. While the first start trains, the batch
    shell gets the time-limit SIGUSR1: it creates the stop file, both ranks stop at the same step
    with its checkpoint, and the job is requeued once the step has ended; the second start, same
    job id, resumes from that checkpoint and finishes without redoing a step."""
    port = free_port()
    scontrol_log = tmp_path / "scontrol.log"
    stop_file = tmp_path / "stop" / "4242"
    env = launcher_env(dict(
        SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
        SLURM_SUBMIT_DIR=str(REPO), PFC_RDZV_PORT=str(port), PFC_NPROC_PER_NODE="1",
        PFC_JOIN_TIMEOUT="60", PFC_DATA_CACHE=str(tmp_path / "data"), OMP_NUM_THREADS="1",
        STANDIN_SCONTROL_LOG=str(scontrol_log), PFC_STOP_FILE=str(stop_file)))
    run_dir = tmp_path / "outputs" / "two-nodes"
    steps = 60

    first = ScriptRun(["bash", str(SBATCH), *_tiny_run(tmp_path, steps), "trainer.stop_poll_s=0"],
                      env, tmp_path)
    try:
        assert first.wait_for("[srun stand-in] node 1/2", 30), first.tail()
        deadline = time.monotonic() + 90  # training has begun once step 0's validation is logged
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        first.signal(signal.SIGUSR1)  # the time-limit warning, while the step trains
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
    assert summary["stopped_by_request"] and 1 <= summary["steps"] < steps, summary
    assert (f"the training stopped at the checkpoint of step {summary['steps']}: requeueing job 4242"
            in out), out
    assert summary["world_size"] == 2 and summary["launcher"] == "torchrun"
    stopped_at = summary["steps"]
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert not stop_file.exists() and not stop_file.with_name("4242.stopped").exists()

    env["SLURM_RESTART_COUNT"] = "1"
    second = ScriptRun(["bash", str(SBATCH), *_tiny_run(tmp_path, steps)], env, tmp_path)
    try:
        rc = second.finish(timeout=120)
    finally:
        second.finish(timeout=0)
    assert rc == 0, second.tail()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["stopped_by_request"]
    assert summary["world_size"] == 2
    # Resumed, not restarted: one step-0 validation (a start from step 0 validates there again),
    # and every logged training step appears once, in order.
    records = _metrics_records(run_dir)
    assert records.count((0, "val")) == 1 and records[-1] == (steps, "val")
    trained = [step for step, kind in records if kind == "train"]
    assert trained == sorted(set(trained)) and trained[-1] == steps
    assert scontrol_log.read_text().count("requeue 4242") == 1  # no requeue without a signal


@pytest.mark.parametrize("job_id", [1, 4242, 12345, 29999, 4294967])
def test_the_port_of_a_slurm_job_lies_below_the_ephemeral_range(job_id):
    """Ranks started by srun without torchrun meet at the port train.sbatch derives for its
    rendezvous: below Linux's ephemeral range (32768-60999), where an outgoing connection
    could already hold it."""
    from partial_fc.train.env import detect_env, slurm_port

    env = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1",
                      "SLURM_JOB_ID": str(job_id)})
    assert env.master_port == slurm_port(job_id) == 20000 + job_id % 10000
    assert 20000 <= env.master_port < 32768
    assert "$((20000 + ${SLURM_JOB_ID:-0} % 10000))" in SBATCH.read_text()
