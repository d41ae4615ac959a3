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


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
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
