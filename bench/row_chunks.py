"""The row sweep's three GEMMs in chunks of R rows against the class sweep's GEMM floor, in one
process (what ``partial_fc.classifier.plan.MIN_CHUNK_ROWS`` is set from).

    python bench/row_chunks.py --threads 2 --classes 100000 --batch 1024 --dim 512

Per R: the floor (``bench/head.py``'s ``gemm_floor``: per block of classes E @ W_b^T, tile @ W_b,
tile^T @ E) then the row sweep's GEMMs (per chunk: E_c @ W^T into an [R x classes] tile, tile @ W,
and tile^T @ E_c accumulated into the [classes x D] weight gradient), best of ``--iters``.
Prints one JSON line per R with ``ratio`` = rows ms / floor ms.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.head import gemm_floor  # noqa: E402
from partial_fc.classifier.plan import default_block_size  # noqa: E402


def row_gemms(e, w, rows_per_chunk):
    """The three GEMMs of a row-sweep step, chunk by chunk."""
    tile = torch.empty(rows_per_chunk, w.shape[0], dtype=e.dtype)
    grad_e, grad_w = torch.empty_like(e), None
    for start in range(0, e.shape[0], rows_per_chunk):
        chunk = e[start:start + rows_per_chunk]
        t = tile[: chunk.shape[0]]
        torch.mm(chunk, w.t(), out=t)
        torch.mm(t, w, out=grad_e[start:start + chunk.shape[0]])
        grad_w = t.t() @ chunk if grad_w is None else grad_w.addmm_(t.t(), chunk)


def best_ms(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(args.batch, args.dim, generator=g)
    w = torch.randn(args.classes, args.dim, generator=g)
    block = default_block_size(args.batch, torch.device("cpu"))
    for rows in args.rows:
        floor = best_ms(lambda: gemm_floor(e, w, args.classes, block, torch.float32), args.iters)
        sweep = best_ms(lambda: row_gemms(e, w, rows), args.iters)
        print(json.dumps({"bench": "row_chunks", "rows_per_chunk": rows, "classes": args.classes,
                          "batch": args.batch, "dim": args.dim, "floor_ms": round(floor, 3),
                          "rows_ms": round(sweep, 3), "ratio": round(sweep / floor, 3),
                          "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
