"""pfc-synthetic: generate a synthetic face-identity set (InsightFace layout + verification pairs)."""
from __future__ import annotations

import argparse
import json
import sys

from partial_fc.data.synthetic import generate_synthetic
from partial_fc.tools.common import removed_on_failure, tool_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pfc-synthetic",
        description="Render procedural face identities (in families of look-alikes) into train.rec/"
        "train.idx/property, plus heldout.bin verification pairs of other identities.",
    )
    p.add_argument("out_dir")
    p.add_argument("--identities", type=int, default=300, help="training identities (default 300)")
    p.add_argument("--images-per-identity", type=int, default=30, help="default 30")
    p.add_argument("--family-size", type=int, default=4, help="identities per family of look-alikes (default 4)")
    p.add_argument("--heldout-identities", type=int, default=120, help="identities of the verification pairs (default 120)")
    p.add_argument("--pairs", type=int, default=1200, help="verification pairs, half positive (default 1200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPUs, at most 8)")
    p.add_argument("--jitter", type=float, default=0.5, help="strength of per-image variation (default 0.5)")
    p.add_argument("--family-spread", type=float, default=0.5,
                   help="distance between family members as a fraction of the population spread (default 0.5)")
    p.add_argument("--same-family-negatives", type=float, default=0.8,
                   help="fraction of negative pairs drawn within a family (default 0.8)")
    p.add_argument("--no-progress", action="store_true")
    return p


@tool_main("pfc-synthetic")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with removed_on_failure(args.out_dir):
        summary = generate_synthetic(
            args.out_dir,
            num_identities=args.identities,
            images_per_identity=args.images_per_identity,
            family_size=args.family_size,
            num_heldout_identities=args.heldout_identities,
            num_pairs=args.pairs,
            seed=args.seed,
            workers=args.workers,
            jitter=args.jitter,
            family_spread=args.family_spread,
            same_family_negatives=args.same_family_negatives,
            progress=not args.no_progress,
        )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
