"""Print the summary table of a finished training run (``summary.json`` in its run dir)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from partial_fc.tools.common import tool_main


def format_summary(summary: dict) -> str:
    first, last = summary.get("val_first") or {}, summary.get("val_last") or {}
    sets = sorted(k[len("val/"):-len("/acc")] for k in last if k.startswith("val/") and k.endswith("/acc"))
    rows = [("steps", str(summary["steps"])),
            ("world size", str(summary.get("world_size", 1))),
            ("samples/s (global)", f"{summary['samples_per_sec']:.1f}"),
            ("skipped steps", str(summary.get("skipped_steps", 0)))]
    for name in sets:
        a0, a1 = first.get(f"val/{name}/acc"), last.get(f"val/{name}/acc")
        s1 = last.get(f"val/{name}/std")
        rows.append((f"{name} acc @ step {first.get('step', 0)}", f"{a0:.4f}" if a0 is not None else "-"))
        rows.append((f"{name} acc @ step {last.get('step')}", f"{a1:.4f} +- {s1:.4f}" if a1 is not None else "-"))
    rows += [("run dir", summary["run_dir"]), ("checkpoints", summary["checkpoints"]),
             ("tensorboard", f"tensorboard --logdir {summary['tensorboard']}"),
             ("metrics", summary["metrics"])]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])


@tool_main("pfc-summary")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a training run directory")
    args = parser.parse_args(argv)
    path = args.run_dir / "summary.json"
    if not path.is_file():
        print(f"error: {path} not found (did the run finish?)", file=sys.stderr)
        return 1
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a readable run summary (JSON: {err})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a run summary of launch/train.py (a JSON {type(summary).__name__}, "
                         "expected an object)")
    try:
        print(format_summary(summary))
    except KeyError as err:
        raise ValueError(f"{path}: not a run summary of launch/train.py (it has no {err} entry)") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
