"""pfc-align: detect, landmark and align the faces of raw photos to 112x112 ArcFace crops.

    pfc-align photos/ aligned/ --workers 8            # one folder per identity in, same out
    pfc-align photos/ aligned/ --landmarks points.txt # 'path x1 y1 ... x5 y5' lines, no detector
    pfc-pack aligned/ train_rec/                      # then pack as usual
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from partial_fc.data.aligning import ALIGN_REPORT_NAME, align_folder
from partial_fc.data.face_detection import METHODS
from partial_fc.tools.common import removed_on_failure, tool_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfc-align", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder of photos (e.g. one sub-folder per identity)")
    parser.add_argument("output", type=Path, help="folder for the aligned crops (same layout, .jpg)")
    parser.add_argument("--landmarks", type=Path, default=None,
                        help="file of 'path x1 y1 ... x5 y5' lines (eyes, nose, mouth corners; "
                        "paths relative to SOURCE): align from these points, no detector")
    parser.add_argument("--keep-largest", action="store_true",
                        help="in photos with several faces, align the largest (default: skip and list them)")
    parser.add_argument("--upsample", type=int, default=1,
                        help="times the detector doubles the photo first (default 1: faces from ~40 px)")
    parser.add_argument("--method", choices=METHODS, default=METHODS[0],
                        help="dlib's HOG detector, its CNN detector (about 10x slower, finds turned "
                        "faces), or HOG with the CNN for photos where HOG finds none (default)")
    parser.add_argument("--size", type=int, default=112, help="crop side in pixels (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: all CPUs)")
    parser.add_argument("--report", type=Path, default=None,
                        help=f"where the JSON report goes (default: OUTPUT/{ALIGN_REPORT_NAME})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def left_out_note(report: dict, report_path: Path) -> str:
    """One line on the photos `report` (align_folder's) left out, why, and what to do; "" when
    every photo was aligned."""
    reasons = {"several_faces": "with several faces", "no_face": "with no face found",
               "unreadable": "unreadable", "no_landmarks": "without a line in the landmark file"}
    counts = {key: len(report.get(key, [])) for key in reasons}
    total = sum(counts.values())
    if not total:
        return ""
    why = ", ".join(f"{n} {reasons[key]}" for key, n in counts.items() if n)
    note = (f"left out {total} of {report['photos']} photo(s) ({why}); "
            f"{report_path} lists them")
    if counts["several_faces"]:
        note += "; rerun with --keep-largest to align the largest face of photos with several faces"
    return note


@tool_main("pfc-align")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with removed_on_failure(args.output):
        report = align_folder(args.source, args.output, landmark_file=args.landmarks,
                              keep_largest=args.keep_largest, upsample=args.upsample, method=args.method,
                              size=args.size, quality=args.quality, workers=max(1, args.workers),
                              progress=not args.no_progress)
    report_path = args.report or args.output / ALIGN_REPORT_NAME
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    summary = {key: value for key, value in report.items() if key != "entries"}
    summary["report"] = str(report_path)
    print(json.dumps(summary, indent=1))
    left_out = left_out_note(report, report_path)
    if left_out:
        print(f"pfc-align: {left_out}", file=sys.stderr)
    if not report["aligned"]:
        print("pfc-align: error: no photo was aligned", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
