"""pfc-pack: pack a folder of identity folders (or a ``path<TAB>label`` list) into InsightFace
RecordIO (``train.rec``, ``train.idx``, ``property``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from partial_fc.data.datasets import IMAGE_EXTENSIONS
from partial_fc.data.packing import RESIZE_MODES, pack_dataset
from partial_fc.tools.common import removed_on_failure, tool_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pfc-pack",
        description="Pack face images into InsightFace-layout RecordIO: header record 0, images as keys "
        "1..N, one [start, end) record per identity, and a 'property' file.",
    )
    p.add_argument("source", help="folder with one sub-folder per identity, or a list file of 'path<TAB>label' "
                   f"lines; image files: {' '.join(IMAGE_EXTENSIONS)} (other files are counted and ignored)")
    p.add_argument("out_dir", help="output folder (train.rec, train.idx, property)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="reader processes (default: all CPUs)")
    p.add_argument("--resize", default=None, metavar="HxW",
                   help="bring every image to S x S or HxW (height x width) and re-encode as JPEG; without it "
                   "all images must have the first image's size")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default=RESIZE_MODES[0],
                   help="stretch: resize (aspect ratio may change; the default); crop: centre crop to the "
                   "target aspect ratio, then resize; pad: resize to fit, centred on black")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--validate", action="store_true", help="decode every image; fail on (or with --skip-bad, drop) broken ones")
    p.add_argument("--reencode", action="store_true", help="re-encode every image as JPEG (e.g. PNG sources)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of failing")
    p.add_argument("--prefix", default="train", help="file name stem (default: train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@tool_main("pfc-pack")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with removed_on_failure(args.out_dir):
        summary = pack_dataset(
            args.source,
            args.out_dir,
            resize=args.resize,
            resize_mode=args.resize_mode,
            quality=args.quality,
            validate=args.validate or args.skip_bad,
            reencode=args.reencode,
            skip_bad=args.skip_bad,
            workers=max(1, args.workers),
            progress=not args.no_progress,
            prefix=args.prefix,
        )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
