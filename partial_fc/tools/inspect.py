"""pfc-inspect: describe a RecordIO face dataset; ``--verify`` reads and decodes every record."""
from __future__ import annotations

import argparse
import json
import sys

from partial_fc.data.inspect import exit_status, format_report, inspect_dataset
from partial_fc.tools.common import tool_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pfc-inspect",
        description="Header, counts, label range and a histogram of images per identity of a RecordIO "
        "face dataset (a folder with train.rec/train.idx/property, or a .rec file). Exit status: 0 "
        "clean, 1 broken records or a class count training refuses, 2 the set does not open, 3 only "
        "warnings (labels that disagree with the identity ranges, surplus identity records).",
    )
    p.add_argument("path", help="dataset folder or .rec file")
    p.add_argument("--verify", action="store_true", help="read and decode every record and list the broken ones")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-errors", type=int, default=None, help="stop after this many broken records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@tool_main("pfc-inspect")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = inspect_dataset(args.path, verify=args.verify, progress=not args.no_progress,
                             max_errors=args.max_errors)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
