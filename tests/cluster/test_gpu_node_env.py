"""What train.sbatch hands every rank on a GPU node: torch's own NCCL error handling, the
flight-recorder dump on a collective timeout, and torch.compile's workers and caches on local disk.
The sbatch script runs for real under the stand-in srun; the launcher it starts records its
environment instead of training."""
from __future__ import annotations

import subprocess

import pytest

from tests.helpers.slurm_harness import REPO, SLURM_DIR, launcher_env

SBATCH = SLURM_DIR / "train.sbatch"
# The variables the script decides (unless exported before sbatch): none may leak in from the
# test process, where torch.compile sets TORCHINDUCTOR_CACHE_DIR once a test has compiled.
SET_HERE = ("TORCH_NCCL_", "TORCH_FR_", "TORCHINDUCTOR_", "TRITON_", "OMP_NUM_THREADS")


def _step_environment(tmp_path, **extra):
    dump = tmp_path / "env.txt"
    launcher = tmp_path / "record-env"
    launcher.write_text(f"#!/usr/bin/env bash\nenv > {dump}\n")
    launcher.chmod(0o755)
    env = launcher_env({})
    for name in [n for n in env if n.startswith(SET_HERE)]:  # torch sets some in this process
        del env[name]
    env.update(SLURM_JOB_ID="777", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="127.0.0.1",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_ON_NODE="64", SLURM_GPUS_ON_NODE="8",
               PFC_TORCHRUN=str(launcher), STANDIN_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
               PFC_STOP_FILE=str(tmp_path / "stop"), USER="alice", **extra)
    proc = subprocess.run(["bash", str(SBATCH), "trainer=gpu"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)


def test_nccl_keeps_torch_error_handling_and_dumps_its_flight_recorder_on_a_timeout(tmp_path):
    env = _step_environment(tmp_path)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in env  # torch's default (3): tear the process down
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == env["TORCH_FR_BUFFER_SIZE"] == "2000"
    trace = str(REPO / "logs" / "nccl-trace-777-rank")
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == env["TORCH_FR_DUMP_TEMP_FILE"] == trace


def test_compile_workers_are_the_rank_share_and_caches_stay_on_local_disk(tmp_path):
    env = _step_environment(tmp_path)
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == "8"  # 64 CPUs over 8 ranks
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/pfc-compile-alice/inductor"
    assert env["TRITON_CACHE_DIR"] == "/tmp/pfc-compile-alice/triton"


@pytest.mark.parametrize("name,value", [("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"), ("TRITON_CACHE_DIR", "/scratch/t"),
                                        ("TORCHINDUCTOR_COMPILE_THREADS", "2"), ("TORCH_NCCL_TRACE_BUFFER_SIZE", "0")])
def test_a_setting_exported_before_sbatch_wins(tmp_path, name, value):
    assert _step_environment(tmp_path, **{name: value})[name] == value


def test_the_caches_follow_pfc_compile_cache(tmp_path):
    env = _step_environment(tmp_path, PFC_COMPILE_CACHE="/local/ssd/c")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/local/ssd/c/inductor" and env["TRITON_CACHE_DIR"] == "/local/ssd/c/triton"
