"""Run the paper comparison (docs/RESULTS.md): every head x seed of the ``paper_compare`` preset,
one ``torchrun`` job after another, each into ``<output root>/paper_compare/<head>-seed<seed>``.

    python bench/paper_compare.py --seeds 0 1 2 --nproc 2

The same points as the Hydra multirun

    torchrun --standalone --nproc_per_node=2 launch/train.py -m experiment=paper_compare \
        trainer.seed=0,1,2 head=npcface,arcface,cosface,mvsoftmax,curricularface

but with a fresh process group per run and a time limit per run, so one stuck or failed run does
not stop the others. Finished runs (``summary.json`` present) are skipped, so the command can be
re-run to complete a sweep. Prints one JSON line per run and a JSON summary at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
HEADS = ("npcface", "arcface", "cosface", "mvsoftmax", "curricularface")


def run_command(head: str, seed: int, run_dir: Path, nproc: int, extra: Sequence[str]) -> List[str]:
    """The torchrun command line of one sweep point (a list: no shell involved)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return launcher + ["--standalone", f"--nproc_per_node={nproc}", str(REPO / "launch" / "train.py"),
                       "experiment=paper_compare", f"head={head}", f"trainer.seed={seed}",
                       f"hydra.run.dir={run_dir}", *extra]


def run_one(command: List[str], env: dict, log, timeout: float) -> str:
    """Run one job in its own process group; on timeout end that group (torchrun and its ranks)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        return f"timed out after {timeout:g}s"
    return "ok" if code == 0 else f"exit code {code}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run")
    parser.add_argument("--output-root", type=Path, default=REPO / "outputs")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = []
    for seed in args.seeds:  # all heads at one seed before the next seed: partial sweeps compare
        for head in args.heads:
            run_dir = (args.output_root / "paper_compare" / f"{head}-seed{seed}").resolve()
            if (run_dir / "summary.json").is_file():
                results.append({"head": head, "seed": seed, "status": "done before"})
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            command = run_command(head, seed, run_dir, args.nproc, args.overrides)
            start = time.perf_counter()
            with open(run_dir / "train.log", "w") as log:
                status = run_one(command, env, log, args.timeout)
            record = {"head": head, "seed": seed, "status": status,
                      "seconds": round(time.perf_counter() - start, 1), "run_dir": str(run_dir)}
            print(json.dumps(record), flush=True)
            results.append(record)
    failed = [r for r in results if r["status"] not in ("ok", "done before")]
    print(json.dumps({"runs": len(results), "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
