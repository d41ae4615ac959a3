"""pfc-export: a trained backbone as ONNX (dynamic batch, checked through onnxruntime) or as an
insightface state_dict.

    pfc-export runs/exp/checkpoints/step_5000 model.onnx
    pfc-export runs/exp/checkpoints/step_5000 backbone.pth --format insightface
    pfc-export backbone.pth model.onnx --arch r100        # an insightface state_dict as ONNX

ONNX: prints JSON {"path", "max_abs_diff"} and fails when onnxruntime and PyTorch disagree by
more than --tolerance. insightface: writes the plain state_dict arcface_torch's
`get_model(arch).load_state_dict(torch.load(path))` takes and prints JSON {"path", "arch"}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from partial_fc.eval.onnx_model import export_and_check
from partial_fc.models import (INSIGHTFACE_ARCHITECTURES, MODEL_NAMES, infer_architecture, load_backbone,
                               save_backbone, stored_backbone_name)
from partial_fc.tools.common import tool_main
from partial_fc.outputs import writing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfc-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="backbone.pt, a checkpoint directory holding it, or an insightface "
                             "state_dict (backbone.pth)")
    parser.add_argument("output", type=Path, help="the .onnx (or, with --format insightface, "
                                                  ".pth) file to write")
    parser.add_argument("--format", choices=("onnx", "insightface"), default="onnx")
    parser.add_argument("--arch", choices=MODEL_NAMES,
                        help="architecture of an insightface state_dict input (default: inferred)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed |onnxruntime - PyTorch| in fp32 (default 1e-4)")
    parser.add_argument("--input-size", type=int, nargs=2, default=(112, 112), metavar=("H", "W"))
    return parser


@tool_main("pfc-export")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == "insightface":
        name = stored_backbone_name(args.checkpoint)
        if name is not None and name not in INSIGHTFACE_ARCHITECTURES:
            raise ValueError(f"{args.checkpoint} holds a {name!r} backbone, which has no insightface "
                             f"equivalent; --format insightface exists for "
                             f"{', '.join(INSIGHTFACE_ARCHITECTURES)} (use the default ONNX format)")
    model = load_backbone(args.checkpoint, arch=args.arch)
    if args.format == "insightface":
        arch, _ = infer_architecture(model.state_dict())
        with writing(args.output, "the backbone"):
            path = save_backbone(args.output, model, arch, format="insightface")
        print(json.dumps({"path": str(path), "arch": arch}))
        return 0
    result = export_and_check(model, args.output, tolerance=args.tolerance, opset=args.opset,
                              exporter=args.exporter, input_size=tuple(args.input_size))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
