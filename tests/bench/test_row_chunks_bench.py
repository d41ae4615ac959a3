"""bench/row_chunks.py runs and reports one JSON line per chunk size (small shapes)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_row_chunks_prints_a_ratio_per_chunk_size():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "row_chunks.py"), "--classes", "300", "--batch", "40",
         "--dim", "8", "--rows", "7", "40", "--iters", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["rows_per_chunk"] for r in records] == [7, 40]
    for r in records:
        assert r["floor_ms"] > 0 and r["rows_ms"] > 0
        assert abs(r["ratio"] - r["rows_ms"] / r["floor_ms"]) <= 0.05 * r["ratio"]
