"""Run bench/head.py over a grid, one subprocess per configuration (so CPU peak RSS is per
configuration), and print each JSON line followed by a Markdown table (with each step's
interleaved bare-GEMM floor and the ratio to it).

    python bench/head_suite.py --preset cpu            # 100K classes, batch 256 / 1024
    python bench/head_suite.py --preset floor --rounds 2 -- --threads 2 --warmup 1 --iters 3
                                                       # the issue's table: NPCFace and ArcFace
                                                       # through the API default and the
                                                       # training config, 100K classes, batch
                                                       # 1024, rounds interleaved
    python bench/head_suite.py --preset gpu-quick      # one GPU, 1M classes, < 10 minutes
    python bench/head_suite.py --preset gpu            # 1M / 4M / 16M classes on one GPU

Every configuration runs the classifier as built (``--build api``: ``PartialFC(head, D, C)``;
``config``: the training config) or with one choice forced (the variants below). On CUDA a
configuration whose estimated memory exceeds the device's is skipped, saying so.

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

# Classifier variants: (label, bench/head.py options). "api" and "config" are the defaults.
API, CONFIG = ("api", ["--build", "api"]), ("config", ["--build", "config"])
REFERENCE = ("reference", ["--impl", "reference"])
CLASSES = ("class sweep", ["--impl", "chunked", "--sweep", "classes"])
ROWS = ("row sweep", ["--impl", "chunked", "--sweep", "rows"])
EAGER = ("eager tiles", ["--impl", "chunked", "--no-fused"])
PRESETS = {
    "cpu": dict(device="cpu", classes=[100_000], batch=[256, 1024], head=["npcface", "arcface"],
                rate=[1.0], variants=[API, REFERENCE, CLASSES, EAGER]),
    "floor": dict(device="cpu", classes=[100_000], batch=[1024], head=["npcface", "arcface"],
                  rate=[1.0], variants=[API, CONFIG]),
    "gpu-quick": dict(device="cuda", classes=[1_000_000], batch=[1024],
                      head=["npcface", "arcface"], rate=[1.0, 0.1], variants=[API],
                      extra=["--warmup", "3", "--iters", "10"]),
    "gpu": dict(device="cuda", classes=[1_000_000, 4_000_000, 16_000_000], batch=[1024],
                head=["npcface", "arcface"], rate=[1.0, 0.1],
                variants=[API, REFERENCE, CLASSES, ROWS, EAGER]),
}
DIM = 512


def estimated_bytes(config) -> int:
    """A generous estimate of a configuration's device memory: the fp32 weight, its gradient
    and momentum and a bf16 copy, plus the reference path's [batch x scored] logits (about six
    live copies) or the chunked path's tiles (at most 64M elements, three live)."""
    classes, batch, rate = config["classes"], config["batch"], config["rate"]
    weights = classes * DIM * (4 * 3 + 2)
    if config["variant"] == "reference":
        return weights + 6 * 4 * batch * int(classes * rate)
    return weights + 3 * 4 * (1 << 26)


def device_bytes(device: str):
    """Total memory of the CUDA device (None on CPU or without one)."""
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def run(config, options, extra, timeout):
    cmd = [sys.executable, str(HEAD), "--device", config["device"], "--classes",
           str(config["classes"]), "--batch", str(config["batch"]), "--head", config["head"],
           "--sample-rate", str(config["rate"]), *options, *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timeout after {timeout}s"}, cmd
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        message = "out of memory" if "out of memory" in (proc.stderr or "").lower() else tail[0]
        return {**config, "error": message[:200]}, cmd
    return {**json.loads(lines[-1]), "variant": config["variant"]}, cmd


def table(rows, device: str) -> list:
    """The Markdown table of the records (no CPU-time columns on CUDA)."""
    cpu = device == "cpu"
    head = ["classes", "batch", "rate", "head", "classifier", "path", "sweep", "compiled", "ms",
            "GEMM floor ms", "x floor"]
    head += (["cpu ms", "x floor (cpu)"] if cpu else []) + ["peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['classes']:,}", r["batch"], r.get("sample_rate", r.get("rate")), r["head"],
                 r["variant"]]
        if "error" in r:
            cells += [r["error"]] + [""] * (len(head) - len(cells) - 1)
        else:
            cells += [r["resolved_impl"], r["resolved_sweep"] or "-", r["compiled"], r["ms"],
                      r.get("gemm_floor_ms", ""), r.get("floor_ratio", "")]
            cells += [r["cpu_ms"], r.get("floor_ratio_cpu", "")] if cpu else []
            cells += [r["peak_gib"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole grid this many times, one round after the other")
    args, extra = p.parse_known_args(argv)
    grid = PRESETS[args.preset]
    extra = grid.get("extra", []) + [a for a in extra if a != "--"]
    memory = device_bytes(grid["device"])
    configs = [dict(device=grid["device"], classes=c, batch=b, rate=r, head=h, variant=v[0],
                    options=v[1])
               for c, b, r, h, v in itertools.product(grid["classes"], grid["batch"], grid["rate"],
                                                      grid["head"], grid["variants"])]
    rows = []
    for _ in range(args.rounds):
        for config in configs:
            config = dict(config)
            options = config.pop("options")
            need = estimated_bytes(config)
            if memory is not None and need > memory:
                record = {**config, "error": f"skipped: needs about {need / 2**30:.0f} GiB, the "
                                             f"device has {memory / 2**30:.0f} GiB"}
            else:
                record, cmd = run(config, options, extra, args.timeout)
                record["command"] = " ".join(["python", "bench/head.py", *cmd[2:]])
            print(json.dumps(record), flush=True)
            rows.append(record)
    print()
    print("\n".join(table(rows, grid["device"])))


if __name__ == "__main__":
    main()
