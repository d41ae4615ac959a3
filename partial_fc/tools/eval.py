"""pfc-eval: verification accuracy and TAR@FAR of a checkpoint or ONNX model.

    pfc-eval runs/exp/checkpoints/step_5000 lfw.bin cfp_fp.bin agedb_30.bin
    pfc-eval model.onnx lfw.bin --ijb-root /data/IJB_release/IJBC --ijb-target IJBC -o results/

Prints a table, writes `eval.json` ({"model", "sets": {name: {"acc", "std", "tar_at_far", ...}},
"ijb": {...}}) and `roc.png` (all sets on one plot) into the output directory. A TAR at a FAR
below 1/(negative pairs) reads "n/a" in the table (a footnote gives the negative pairs it needs)
and "n/a (needs >= 1/FAR negative pairs)" in eval.json; a set whose embeddings are
non-finite (a diverged model) is reported as failed, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from partial_fc.eval import metrics
from partial_fc.eval.ijb import evaluate_ijb
from partial_fc.eval.plots import plot_roc
from partial_fc.eval.verification import evaluate_bins
from partial_fc.tools.common import (add_inference_arguments, autocast_dtype, load_model_from_args,
                                     resolve_device, tool_main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfc-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path,
                        help="backbone.pt, a checkpoint directory holding it, an insightface "
                             "state_dict (backbone.pth) or an .onnx file")
    parser.add_argument("bins", type=Path, nargs="*", help="verification .bin files (LFW, CFP-FP, ...)")
    parser.add_argument("--ijb-root", type=Path, help="an IJB-B/C release (meta/, loose_crop/)")
    parser.add_argument("--ijb-target", choices=("IJBB", "IJBC"), default="IJBC")
    parser.add_argument("--no-face-score", dest="face_score", action="store_false",
                        help="IJB: do not weight faces by their detector score")
    parser.add_argument("--normalize-faces", action="store_true",
                        help="IJB: L2-normalise each face before pooling (drops the norm)")
    parser.add_argument("--folds", type=int, default=metrics.FOLDS,
                        help=f"folds of the verification protocol (default {metrics.FOLDS})")
    parser.add_argument("-o", "--output-dir", type=Path,
                        help="where eval.json and roc.png go (default: <model dir>/eval)")
    add_inference_arguments(parser)
    return parser


def _default_output_dir(model: Path) -> Path:
    return (model if model.is_dir() else model.parent) / "eval"


def unresolved_far(far: float) -> str:
    """What the table and eval.json say for a FAR the set has too few negative pairs for."""
    return f"n/a (needs >= {round(1 / far):,} negative pairs)"


def _tar_cell(tars: dict, far: float, unresolved: set) -> str:
    if not tars:
        return "-"
    tar = tars[metrics.far_key(far)]
    if tar is None:
        unresolved.add(far)
        return "n/a"
    return f"{100 * tar:.2f}%"


def format_table(sets: Dict[str, dict], ijb: Dict[str, dict], fars: Sequence[float]) -> str:
    far_headers = [f"TAR@{metrics.far_key(f)}" for f in fars]
    header = ["set", "pairs", "accuracy", "std"] + far_headers
    rows: List[List[str]] = []
    failures = []
    unresolved: set = set()  # FARs some set has too few negative pairs for
    for name, r in sets.items():
        if "failed" in r:
            rows.append([name, str(r["num_pairs"]), "FAILED", "-"] + ["-" for _ in fars])
            failures.append(f"{name}: {r['failed']}")
            continue
        tars = r.get("tar_at_far", {})
        rows.append([name, str(r["num_pairs"]), f"{100 * r['acc']:.2f}%", f"+-{100 * r['std']:.2f}%"]
                    + [_tar_cell(tars, f, unresolved) for f in fars])
    for name, r in ijb.items():
        rows.append([name, str(r["num_pairs"]), "-", "-"]
                    + [f"{100 * r['tar_at_far'][metrics.far_key(f)]:.2f}%" for f in fars])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"TAR@{metrics.far_key(f)}: {unresolved_far(f)}"
             for f in sorted(unresolved, reverse=True)]
    return "\n".join(lines + notes + failures)


@tool_main("pfc-eval")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.bins and args.ijb_root is None:
        build_parser().error("give at least one .bin file or --ijb-root")
    device = resolve_device(args.device)
    model = load_model_from_args(args, device)
    amp = autocast_dtype(args.amp)

    sets = evaluate_bins(model, args.bins, batch_size=args.batch_size, device=device,
                         flip=args.flip, folds=args.folds, autocast_dtype=amp, keep_scores=True,
                         progress=True) if args.bins else {}
    curves = {}
    for name, r in sets.items():
        if "tar_at_far" in r and "failed" not in r:
            fpr, tpr, _ = metrics.roc(r["scores"], r["issame"])
            curves[name] = (fpr, tpr)
    ijb = {}
    if args.ijb_root is not None:
        r = evaluate_ijb(model, args.ijb_root, target=args.ijb_target,
                         batch_size=args.batch_size, device=device, num_workers=args.num_workers,
                         flip=args.flip, face_score_weighting=args.face_score,
                         normalize_faces=args.normalize_faces, autocast_dtype=amp)
        ijb[args.ijb_target] = r
        curves[args.ijb_target] = (r["fpr"], r["tpr"])

    print(format_table(sets, ijb, metrics.DEFAULT_FARS))
    out_dir = args.output_dir or _default_output_dir(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    drop = {"scores", "issame", "labels", "fpr", "tpr"}
    report = {
        "model": str(args.model),
        "sets": {n: _json_set(r, drop) for n, r in sets.items()},
        "ijb": {n: {k: v for k, v in r.items() if k not in drop} for n, r in ijb.items()},
    }
    json_path = out_dir / "eval.json"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(f"wrote {json_path}")
    if curves:
        png = plot_roc(curves, out_dir / "roc.png", title=f"ROC: {args.model.name}")
        print(f"wrote {png}")
    return 1 if any("failed" in r for r in sets.values()) else 0


def _json_set(result: dict, drop) -> dict:
    out = {k: v for k, v in result.items() if k not in drop}
    if "tar_at_far" in out:
        out["tar_at_far"] = {k: v if v is not None else unresolved_far(float(k))
                             for k, v in out["tar_at_far"].items()}
    return out


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
