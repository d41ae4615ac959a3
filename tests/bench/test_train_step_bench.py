"""bench/train_step.py times the Trainer's own step, built from the config, on 1 and 2 ranks."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from partial_fc.train.env import DistEnv

from tests.helpers.bench_scripts import BENCH_DIR, load_bench_script
from tests.helpers.e2e import REPO, TORCHRUN

SMALL = ["--model", "tiny", "--batch", "4", "--classes", "40", "--warmup", "1", "--iters", "1"]


def _records(out: str):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_the_bench_times_the_configured_trainer_step(monkeypatch):
    bench = load_bench_script("train_step")
    calls = []
    real_step = bench.builders.Trainer.train_step

    def counted(trainer):  # the Trainer's own method runs: counted, not replaced
        calls.append(trainer)
        return real_step(trainer)

    monkeypatch.setattr(bench.builders.Trainer, "train_step", counted)
    args = bench.parse_args(SMALL + ["trainer=cpu", "head.impl=chunked", "trainer.precision=bf16"])
    cfg = bench.compose(args, cuda=False)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = bench.build(cfg, DistEnv(), bench.torch.device("cpu"), Path(run_dir), num_classes=40)
        seconds = bench.time_steps(trainer, warmup=1, iters=2, cuda=False)
    assert len(calls) == 3 and seconds > 0
    assert trainer.classifier.last_impl == "chunked" and trainer.settings.precision == "bf16"
    assert trainer.step == 3 and trainer.classifier.num_classes == 40


def test_two_ranks_report_the_global_batch():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(BENCH_DIR / "train_step.py"),
                          *SMALL, "trainer=cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    (record,) = _records(out)  # rank 0 only
    assert record["world_size"] == 2 and record["global_batch"] == 8
    assert abs(record["samples_per_s"] - 8e3 / record["ms"]) <= 0.01 * record["samples_per_s"]
    assert record["impl"] in ("reference", "chunked") and record["device"] == "cpu"


def test_one_process_prints_one_json_line_with_the_step_costs():
    out = subprocess.run([sys.executable, str(BENCH_DIR / "train_step.py"), *SMALL, "--profile", "trainer=cpu"],
                         cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300, check=True).stdout
    (record,) = _records(out)
    assert record["global_batch"] == 4 and record["classes_per_rank"] == 40 and record["ms"] > 0
    assert record["bookkeeping_ops"] > 0 and record["host_reads"] >= 2  # the trainer's two, at least
