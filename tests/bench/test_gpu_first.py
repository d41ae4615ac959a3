"""bench/gpu_first.py, the Python half of bench/gpu_first.sh, on the CPU: the checks that run here
give real figures, the table says what failed, and the script parses."""
import json
import subprocess
import sys

import pytest

from tests.helpers.bench_scripts import BENCH_DIR
from tests.helpers.e2e import REPO


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(BENCH_DIR / "gpu_first.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _rows(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"part"')]


def test_two_gloo_ranks_on_one_device_match_the_unsharded_classifier():
    proc = _run("shared-gpu")
    rows = _rows(proc.stdout)
    assert [r["part"] for r in rows] == ["2 ranks on one CPU (reference)", "2 ranks on one CPU (chunked)"]
    for r in rows:
        assert r["status"] == "ok" and max(r["loss_error"], r["grad_embeddings_error"], r["grad_weight_error"]) < 1e-5


def test_a_recipe_share_of_the_classifier_is_timed_counted_and_checked_against_the_reference():
    (row,) = _rows(_run("classifier", "--recipes", "ms1mv2_r100_npcface").stdout)
    assert row["status"] == "ok" and row["classes"] == 85742 // 8 and row["global_batch"] == 8 * 128
    assert row["ms"] > 0 and isinstance(row["syncs_per_step"], int) and row["syncs_per_step"] > 0
    assert row["loss_error"] < 1e-6  # the recipe's fp32 CPU path is the reference path itself


def test_without_cuda_the_device_checks_say_they_are_skipped():
    rows = _rows(_run("nccl").stdout) + _rows(_run("versions").stdout)
    status = {r["part"]: r["status"] for r in rows}
    assert status["nccl (1 rank)"] == "skipped" and status["mm out_dtype"] == "skipped"
    assert status["versions"] == "ok" and status["compile"] in ("ok", "failed")


def test_the_table_lists_every_row_and_fails_when_a_check_failed(tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = [{"part": "versions", "status": "ok", "detail": "torch"},
            {"part": "classifier x", "status": "ok", "detail": "", "ms": 12.5, "loss_error": 3e-4},
            {"part": "nccl (1 rank)", "status": "skipped", "detail": "no CUDA"}]
    rows.write_text("\n".join(json.dumps(r) for r in good) + "\nnot a row\n")
    proc = _run("table", str(rows))
    assert proc.returncode == 0
    assert "| classifier x | ok | 12.5 |" in proc.stdout and "3.0e-04" in proc.stdout
    assert "3 checks: 2 ok, 0 failed, 1 skipped (nccl (1 rank))" in proc.stdout
    rows.write_text(rows.read_text() + json.dumps({"part": "fp16 leg", "status": "failed", "detail": "x"}) + "\n")
    proc = _run("table", str(rows))
    assert proc.returncode == 1 and "1 failed (fp16 leg)" in proc.stdout


@pytest.mark.parametrize("script", ["gpu_first.sh", "gpu_suite.sh"])
def test_the_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(BENCH_DIR / script)], check=True)
