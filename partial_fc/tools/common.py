"""Small helpers shared by the command-line tools."""
from __future__ import annotations

import argparse
from typing import Optional

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device when there is one, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(name: str) -> Optional[torch.dtype]:
    return {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--arch for insightface state_dicts and the input convention of foreign models."""
    from partial_fc.eval.embedding import INPUT_MEAN, INPUT_STD
    from partial_fc.models import MODEL_NAMES

    parser.add_argument("--arch", choices=MODEL_NAMES,
                        help="architecture of an insightface state_dict (backbone.pth); "
                             "default: inferred from its keys")
    parser.add_argument("--input-mean", type=float, default=INPUT_MEAN,
                        help=f"the model takes (pixel - mean) / std (default {INPUT_MEAN})")
    parser.add_argument("--input-std", type=float, default=INPUT_STD,
                        help=f"see --input-mean (default {INPUT_STD}; insightface's: 127.5)")
    parser.add_argument("--bgr", action="store_true",
                        help="the model takes BGR channel order (default RGB)")


def load_model_from_args(args: argparse.Namespace, device: torch.device):
    """The eval model that `add_model_arguments` options and `args.model` describe."""
    from partial_fc.eval.embedding import InputConvention
    from partial_fc.eval.onnx_model import load_eval_model

    convention = InputConvention(mean=args.input_mean, std=args.input_std, bgr=args.bgr)
    return load_eval_model(args.model, device=device, arch=args.arch, convention=convention)


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="images per forward (default 128)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none",
                        help="autocast dtype for PyTorch backbones (default none: fp32)")
    parser.add_argument("--no-flip", dest="flip", action="store_false",
                        help="embed the image only, without adding its mirror's embedding")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader workers decoding images (default 0)")
