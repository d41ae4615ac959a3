"""ONNX export of a backbone (dynamic batch), its check through onnxruntime, and running it.

The exported graph takes "input" float32 N x 3 x H x W ((x - 127.5) / 128) and returns
"embedding" float32 N x D, the backbone's unnormalised embedding. Other ONNX face models (fixed
batch, BGR, other mean / std, as insightface's model zoo publishes them) run through
`OnnxBackbone` and `load_eval_model(..., convention=InputConvention(...))`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .embedding import InputConvention, Reconvention

PathLike = Union[str, os.PathLike]
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
_TWO_GB = 2 ** 31


def export_onnx(model: nn.Module, output_path: PathLike, input_size: Tuple[int, int] = (112, 112),
                opset: Optional[int] = None, exporter: str = "dynamo") -> Path:
    """Write `model` (in eval mode, fp32, on CPU) to `output_path` with a dynamic batch axis.

    `exporter` "dynamo" (torch.export based, needs onnxscript) or "torchscript" (the legacy
    exporter). Weights live inside the .onnx file unless they exceed the 2 GB protobuf limit.
    """
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    example = torch.randn(2, 3, *input_size)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with torch.no_grad(), _known_exporter_noise_silenced():
        if exporter == "dynamo":
            torch.onnx.export(model, (example,), str(output_path), dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=nbytes >= _TWO_GB, verbose=False, **kwargs)
        elif exporter == "torchscript":
            torch.onnx.export(model, (example,), str(output_path), dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              **kwargs)
        else:
            raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    return output_path


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _known_exporter_noise_silenced():
    """Drop two messages torch's ONNX exporter prints on every export that say nothing about
    the model: the 'torchvision is not installed. Skipping torchvision::...' log lines (we use no
    torchvision ops) and the FutureWarning on `isinstance(treespec, LeafSpec)` from torch's own
    pytree code. Every other warning and log record passes."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    drop = _DropMessages("torchvision is not installed. Skipping")
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


def _providers(device: Optional[Union[str, torch.device]]) -> Sequence[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device is not None and torch.device(device).type == "cuda" \
            and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackbone(nn.Module):
    """An ONNX face model run by onnxruntime behind the nn.Module call interface.

    The model must take one NCHW float input of 112x112 (or free) spatial size; a fixed batch
    size is honoured by running any batch in chunks of that size (the last one zero-padded).
    `forward` takes a float tensor on any device and returns float32 embeddings on the same
    device. It has no parameters; `train()` / `eval()` change nothing in the graph.

    Raises ValueError naming the file when the input is not one rank-4 NCHW 3-channel tensor
    of 112x112.
    """

    def __init__(self, path: PathLike, device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=list(_providers(device)))
        except Exception as err:  # onnxruntime raises its own pybind types
            raise ValueError(f"{self.path}: not a loadable ONNX model ({self.path.stat().st_size} bytes): "
                             f"{str(err).strip().splitlines()[0][:300]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.fixed_batch = _check_input_shape(self.path, self.input_shape)
        self.embedding_size = self.session.get_outputs()[0].shape[-1]

    def _run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(array)})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().float().cpu().numpy()
        if self.fixed_batch is None:
            out = self._run(array)
        else:
            step, chunks = self.fixed_batch, []
            for start in range(0, array.shape[0], step):
                part = array[start:start + step]
                if part.shape[0] < step:
                    pad = np.zeros((step - part.shape[0],) + part.shape[1:], dtype=part.dtype)
                    chunks.append(self._run(np.concatenate([part, pad]))[:part.shape[0]])
                else:
                    chunks.append(self._run(part))
            out = np.concatenate(chunks)
        return torch.from_numpy(out).to(x.device)


def _check_input_shape(path: Path, shape: Sequence) -> Optional[int]:
    """The fixed batch size of an ONNX input `shape` (None when dynamic), after checking that it
    is N x 3 x 112 x 112 with any dimension possibly symbolic."""
    def fixed(dim):
        return dim if isinstance(dim, int) and dim > 0 else None

    expected = "N x 3 x 112 x 112 (NCHW)"
    if len(shape) != 4:
        raise ValueError(f"{path}: input of rank {len(shape)} {shape}; expected {expected}")
    if fixed(shape[1]) not in (3, None):
        layout = " (channels last: NHWC is not supported)" if fixed(shape[3]) == 3 else ""
        raise ValueError(f"{path}: input {shape} has {shape[1]} channels{layout}; "
                         f"expected {expected}")
    size = tuple(fixed(d) for d in shape[2:])
    if any(d is not None and d != 112 for d in size):
        raise ValueError(f"{path}: input {shape} takes {shape[2]}x{shape[3]} images; our faces "
                         f"are aligned to 112x112, expected {expected}")
    return fixed(shape[0])


def compare_with_torch(model: nn.Module, onnx_path: PathLike, batch_sizes: Sequence[int] = (1, 3),
                       input_size: Tuple[int, int] = (112, 112), seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| over random inputs of several batch sizes (fp32, CPU)."""
    model = copy.deepcopy(model).float().cpu().eval()
    runner = OnnxBackbone(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for n in batch_sizes:
            x = torch.rand(n, 3, *input_size, generator=gen) * 2 - 1  # the preprocessed range
            diff = (runner(x) - model(x)).abs().max().item()
            worst = max(worst, diff)
    return worst


def export_and_check(model: nn.Module, output_path: PathLike, tolerance: float = 1e-4,
                     **export_kwargs) -> Dict[str, object]:
    """Export, then compare with PyTorch; raises if the difference exceeds `tolerance`."""
    path = export_onnx(model, output_path, **export_kwargs)
    input_size = export_kwargs.get("input_size", (112, 112))
    diff = compare_with_torch(model, path, input_size=input_size)
    if not diff <= tolerance:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} "
                           f"(tolerance {tolerance:.3g})")
    return {"path": str(path), "max_abs_diff": diff}


def load_eval_model(path: PathLike, device: Optional[Union[str, torch.device]] = None,
                    arch: Optional[str] = None,
                    convention: InputConvention = InputConvention()) -> nn.Module:
    """A backbone for evaluation: an `.onnx` file (run by onnxruntime), or a `save_backbone` file,
    checkpoint directory or insightface state_dict (architecture `arch`, or inferred; moved to
    `device`). `convention` is the input the model expects; when it differs from ours the model
    is wrapped to convert our preprocessed images to it."""
    from partial_fc.models import load_backbone

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        model: nn.Module = OnnxBackbone(path, device=device)
    else:
        model = load_backbone(path, arch=arch)
        model = model.to(device) if device is not None else model
    return model if convention.is_ours() else Reconvention(model, convention)
