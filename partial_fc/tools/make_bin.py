"""pfc-make-bin: an insightface verification `.bin` from a folder of images and a pairs list.

    pfc-make-bin lfw/ pairs.txt -o lfw.bin                    # LFW's own pairs.txt layout
    pfc-make-bin photos/ my_pairs.txt -o mine.bin --crop 150  # 'path1 path2 0|1' lines
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from partial_fc.data.packing import parse_size
from partial_fc.eval.pairs import make_bin
from partial_fc.tools.common import removed_on_failure, tool_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfc-make-bin", description=__doc__.split("\n\n")[0])
    parser.add_argument("image_root", type=Path, help="folder the pairs list's images are under")
    parser.add_argument("pairs", type=Path,
                        help="LFW pairs.txt ('name n1 n2' / 'name1 n1 name2 n2' after a header) "
                        "or a list of 'path1 path2 0|1' lines")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .bin to write")
    parser.add_argument("--size", default="112", help="output image size, S or HxW (default 112)")
    parser.add_argument("--crop", default=None,
                        help="centre crop S or HxW taken before resizing (default: none)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    parser.add_argument("--ext", default=".jpg", help="image extension in LFW layout (default .jpg)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="image reader processes (default: all CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


@tool_main("pfc-make-bin")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with removed_on_failure(args.output):
        summary = make_bin(args.image_root, args.pairs, args.output, size=parse_size(args.size),
                           crop=parse_size(args.crop), quality=args.quality, ext=args.ext,
                           workers=max(1, args.workers), progress=not args.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
