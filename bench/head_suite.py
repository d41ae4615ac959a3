"""Run bench/head.py over a grid, one subprocess per configuration (so CPU peak RSS is per
configuration), and print each JSON line followed by a Markdown table (with each step's
interleaved bare-GEMM floor and the ratio to it; the chunked path unfused and fused).

    python bench/head_suite.py --preset cpu            # 100K classes, batch 256 / 1024
    python bench/head_suite.py --preset floor --rounds 2 -- --warmup 1 --iters 3
                                                       # the chunked head's variants at 100K
                                                       # classes, batch 1024, rounds interleaved
    python bench/head_suite.py --preset gpu            # 1M / 4M / 16M classes on one CUDA device

The chunked path runs as: unfused (class sweep), fused with the class sweep, fused with
``--sweep auto`` (the row sweep where its tile fits) and, on CUDA, fused with the row sweep
forced (``--sweep rows``: chunks within the tile budget, to compare against the class sweep).

Extra arguments after ``--`` go to every bench/head.py run (e.g. ``-- --iters 3``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

HEAD = Path(__file__).resolve().parent / "head.py"

# (fused, sweep) of the chunked path's runs.
CHUNKED_CPU = [(False, "classes"), (True, "classes"), (True, "auto")]
PRESETS = {
    "cpu": dict(device="cpu", classes=[100_000], batch=[256, 1024], head=["npcface", "arcface"],
                impl=["reference", "chunked"], rate=[1.0], chunked=CHUNKED_CPU),
    "floor": dict(device="cpu", classes=[100_000], batch=[1024], head=["npcface", "arcface"],
                  impl=["chunked"], rate=[1.0], chunked=CHUNKED_CPU),
    "gpu": dict(device="cuda", classes=[1_000_000, 4_000_000, 16_000_000], batch=[1024],
                head=["npcface", "arcface"], impl=["reference", "chunked"], rate=[1.0, 0.1],
                chunked=CHUNKED_CPU + [(True, "rows")]),
}


def run(config, extra, timeout):
    cmd = [sys.executable, str(HEAD), "--device", config["device"], "--classes",
           str(config["classes"]), "--batch", str(config["batch"]), "--head", config["head"],
           "--impl", config["impl"], "--sample-rate", str(config["rate"]),
           "--fused" if config["fused"] else "--no-fused", "--sweep", config["sweep"], *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timeout after {timeout}s"}, cmd
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        message = "out of memory" if "out of memory" in (proc.stderr or "").lower() else tail[0]
        return {**config, "error": message[:200]}, cmd
    return json.loads(lines[-1]), cmd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole grid this many times, one round after the other")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    grid = PRESETS[args.preset]
    configs = []
    for classes, batch, rate, head, impl in itertools.product(
        grid["classes"], grid["batch"], grid["rate"], grid["head"], grid["impl"]
    ):
        if impl == "reference" and grid["device"] == "cuda" and classes * rate > 4_000_000:
            continue  # the materialised logits alone exceed the device (bench/RESULTS.md, anchor)
        variants = grid["chunked"] if impl == "chunked" else [(False, "auto")]
        configs += [dict(device=grid["device"], classes=classes, batch=batch, head=head,
                         impl=impl, rate=rate, fused=fused, sweep=sweep)
                    for fused, sweep in variants]
    rows = []
    for _ in range(args.rounds):
        for config in configs:
            record, cmd = run(config, extra, args.timeout)
            record["command"] = " ".join(["python", "bench/head.py", *cmd[2:]])
            print(json.dumps(record), flush=True)
            rows.append(record)
    print()
    print("| classes | batch | rate | head | impl | fused | sweep | ms | cpu ms | GEMM floor ms | "
          "x floor | x floor (cpu) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sweep = r.get("resolved_sweep") or "-"
        if "error" in r:
            print(f"| {r['classes']:,} | {r['batch']} | {r['rate']} | {r['head']} | {r['impl']} "
                  f"| {r['fused']} | {r['sweep']} | {r['error']} | | | | | |")
        else:
            print(f"| {r['classes']:,} | {r['batch']} | {r['sample_rate']} | {r['head']} | "
                  f"{r['impl']} | {r['fused']} | {sweep} | {r['ms']:.1f} | {r.get('cpu_ms', '')} "
                  f"| {r.get('gemm_floor_ms', '')} | {r.get('floor_ratio', '')} | "
                  f"{r.get('floor_ratio_cpu', '')} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
