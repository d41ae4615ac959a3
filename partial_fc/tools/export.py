"""pfc-export: ONNX export of a trained backbone (dynamic batch), checked through onnxruntime.

    pfc-export runs/exp/checkpoints/step_5000 model.onnx

Prints JSON {"path", "max_abs_diff"} and fails when onnxruntime and PyTorch disagree by more
than --tolerance.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from partial_fc.eval.onnx_model import export_and_check
from partial_fc.models import load_backbone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfc-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="backbone.pt or a checkpoint directory holding it")
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed |onnxruntime - PyTorch| in fp32 (default 1e-4)")
    parser.add_argument("--input-size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    model = load_backbone(args.checkpoint)
    result = export_and_check(model, args.output, tolerance=args.tolerance, opset=args.opset,
                              exporter=args.exporter, input_size=tuple(args.input_size))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
