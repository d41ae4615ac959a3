"""Small helpers shared by the command-line tools."""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from partial_fc.data.face_detection import DetectorUnavailable

# Errors that mean "this input is wrong" (every data/eval/model error class of ours derives from
# ValueError; a missing or unreadable file is an OSError): one line and rc 2, no traceback.
KNOWN_INPUT_ERRORS = (ValueError, OSError, pickle.UnpicklingError, DetectorUnavailable)
INPUT_ERROR_STATUS = 2


def error_line(prog: str, err: BaseException) -> str:
    """`<prog>: error: <message>` (argparse's form); a message that lists several entries keeps
    them on the lines that follow."""
    message = str(err).strip() or type(err).__name__
    return f"{prog}: error: {message}"


def tool_main(prog: str) -> Callable:
    """Decorator for a console script's `main(argv) -> int`: a KNOWN_INPUT_ERRORS exception
    becomes one `prog: error: ...` line on stderr and exit status 2; any other exception keeps
    its traceback."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> int:
            try:
                return main(argv)
            except KNOWN_INPUT_ERRORS as err:
                print(error_line(prog, err), file=sys.stderr)
                return INPUT_ERROR_STATUS
        return run
    return wrap


@contextlib.contextmanager
def removed_on_failure(path: "os.PathLike | str") -> Iterator[None]:
    """Run the block; if it raises, delete what it created at `path` (a file or folder) and the
    parent folders it created, then re-raise. A `path` that existed before is left alone (its
    writers replace files atomically), so a pre-existing folder's contents are never removed."""
    first_new = None
    for candidate in [Path(path), *Path(path).parents]:
        if candidate.exists():
            break
        first_new = candidate
    try:
        yield
    except BaseException:
        if first_new is not None and first_new.exists():
            if first_new.is_dir():
                shutil.rmtree(first_new, ignore_errors=True)
            else:
                first_new.unlink()
        raise


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
