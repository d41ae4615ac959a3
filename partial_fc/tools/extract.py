"""pfc-extract: embeddings of every face in an image folder or a .rec, written as .npy.

    pfc-extract model.onnx aligned_faces/ feats.npy      # feats.npy + feats.keys.npy
    pfc-extract runs/exp/checkpoints/step_5000 train.rec feats.npy   # + feats.labels.npy
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from partial_fc.eval.extraction import extract_features, write_features
from partial_fc.tools.common import (add_inference_arguments, autocast_dtype, load_model_from_args,
                                     resolve_device, tool_main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfc-extract", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path,
                        help="backbone.pt, a checkpoint directory holding it, an insightface "
                             "state_dict (backbone.pth) or an .onnx file")
    parser.add_argument("source", type=Path, help="a folder of aligned face crops, or a .rec file")
    parser.add_argument("output", type=Path, help="features .npy (keys go to <name>.keys.npy)")
    parser.add_argument("--idx", type=Path, help="the .idx of a .rec (default: beside it)")
    parser.add_argument("--no-normalize", dest="normalize", action="store_false",
                        help="keep the embedding norms (default: L2-normalise)")
    parser.add_argument("--resize", action="store_true",
                        help="rescale crops of another size to 112x112 instead of failing")
    add_inference_arguments(parser)
    return parser


@tool_main("pfc-extract")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    model = load_model_from_args(args, device)
    feats, keys, labels = extract_features(
        model, args.source, idx_path=args.idx, batch_size=args.batch_size, device=device,
        num_workers=args.num_workers, flip=args.flip, normalize=args.normalize,
        resize=args.resize, autocast_dtype=autocast_dtype(args.amp))
    written = write_features(args.output, feats, keys, labels)
    print(json.dumps({"count": int(feats.shape[0]), "dim": int(feats.shape[1]),
                      **{k: str(v) for k, v in written.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
