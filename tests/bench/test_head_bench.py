"""bench/head.py and bench/head_suite.py: a small run through the API default and the training
config; the suite's memory filter and its table (no CPU-time columns on CUDA)."""
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--classes", "3000", "--batch", "40", "--dim", "8", "--warmup", "1", "--iters", "1",
         "--threads", "1"]


def _run(*options):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "head.py"), *SMALL, *options],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_the_head_bench_reports_the_plan_of_what_it_built():
    api, config = _run(), _run("--build", "config", "--impl", "chunked", "--no-fused")
    assert (api["impl"], api["fused"], api["sweep"], api["resolved_impl"]) == (
        "auto", True, "auto", "reference")
    assert config["build"] == "config" and config["resolved_impl"] == "chunked"
    assert config["resolved_sweep"] == "classes" and config["compiled"] is False
    for record in (api, config):
        assert record["ms"] > 0 and record["gemm_floor_ms"] > 0 and "cpu_ms" in record
        ratio = record["ms"] / record["gemm_floor_ms"]
        assert abs(record["floor_ratio"] - ratio) < 0.01 * ratio


def test_the_suite_skips_what_cannot_fit_and_leaves_cpu_time_out_on_cuda():
    suite = load_bench_script("head_suite")
    big = dict(classes=16_000_000, batch=1024, rate=1.0, variant="api")
    assert 80 * 2**30 < suite.estimated_bytes(big) < 139 * 2**30  # an H100 no, an H200 yes
    assert suite.estimated_bytes({**big, "classes": 4_000_000, "variant": "reference"}) > 80 * 2**30
    record = dict(classes=10, batch=4, sample_rate=1.0, head="npcface", variant="api",
                  resolved_impl="chunked", resolved_sweep="rows", compiled=True, ms=1.0,
                  gemm_floor_ms=0.8, floor_ratio=1.25, cpu_ms=2.0, floor_ratio_cpu=1.3,
                  peak_gib=0.1)
    cuda, cpu = suite.table([record], "cuda"), suite.table([record], "cpu")
    assert "cpu ms" not in cuda[0] and "cpu ms" in cpu[0]
    assert len(cuda[2].split("|")) == len(cuda[0].split("|"))
