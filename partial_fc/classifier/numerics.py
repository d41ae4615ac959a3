"""Dtypes, norms and GEMMs both classifier paths share (docs/ALGORITHM.md, section 8).

Statistics never run below fp32; a GEMM on bf16/fp16 inputs gives fp32 results (the device's
``mm(out_dtype=float32)`` where it has one, probed once per process; elsewhere the product of the
rounded inputs is formed in fp32), so low-precision inputs cost precision once, not twice.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)

# F.normalize's default floor on the norm; the chunked path reproduces it exactly.
NORM_EPS = 1e-12


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: statistics never run below fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def resolve_gemm_dtype(embeddings: torch.Tensor, work: torch.dtype,
                       gemm_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The GEMM's input dtype: explicit, else the active autocast dtype on this device, else the
    embeddings' own dtype when it is bf16/fp16, else the (fp32/fp64) working dtype."""
    if gemm_dtype is not None:
        return gemm_dtype
    device_type = embeddings.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if embeddings.dtype in LOW_PRECISION:
        return embeddings.dtype
    return work


def normalize_rows(x: torch.Tensor):
    """(x / max(|x|, eps), |x|) row-wise, as F.normalize computes it."""
    norm = x.norm(dim=1)
    return x / norm.clamp_min(NORM_EPS)[:, None], norm


def normalize_backward(grad_unit: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor):
    """Gradient w.r.t. x of x / max(|x|, eps) given the gradient w.r.t. the result."""
    radial = (unit * grad_unit).sum(dim=1, keepdim=True)
    projected = grad_unit - unit * radial * (norm >= NORM_EPS)[:, None].to(unit.dtype)
    return projected / norm.clamp_min(NORM_EPS)[:, None]


@functools.lru_cache(maxsize=None)
def mm_has_out_dtype(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on this
    device type (CUDA in recent torch; not CPU in torch 2.13). Probed once per process."""
    a = torch.zeros(1, 1, dtype=dtype, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b with the result in ``out_dtype`` (written into ``out`` when given and of that
    dtype). bf16/fp16 inputs accumulate and return in fp32 (see the module docstring)."""
    if a.dtype in LOW_PRECISION:
        if mm_has_out_dtype(a.device.type, a.dtype):
            return torch.mm(a, b, out_dtype=torch.float32).to(out_dtype)
        return matmul(a.float(), b.float(), out_dtype, out)
    if out is not None and out.dtype == a.dtype == out_dtype:
        return torch.mm(a, b, out=out)
    return (a @ b).to(out_dtype)


def add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b (in place when the dtypes allow, else through an fp32 product)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += matmul(a, b, acc.dtype)
