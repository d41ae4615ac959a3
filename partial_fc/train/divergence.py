"""Whether a run can still learn: non-finite model state and runs of skipped steps, and the
squared norm both the gradient norm and the state check are made of."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch


class TrainingDivergedError(RuntimeError):
    """The run cannot learn any more: its model state holds NaN/inf, or too many consecutive
    steps had a non-finite loss or gradient. No checkpoint is written after it."""


@torch.no_grad()
def squared_norm(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of the squares of every element of ``tensors``: a 0-dim float32 tensor on ``device``
    (0 for no tensors), accumulated in float32, or float64 for float64 tensors.

    A constant number of operations however many tensors there are: one ``_foreach_norm`` per
    (device, dtype) group (a multi-tensor kernel on CUDA, the fused form ``torch.optim`` and
    ``clip_grad_norm_`` use), then a stack and a sum. NaN and inf propagate, so the result is
    finite only when every element is (the converse fails only when finite values are so large,
    about 1e19 in float32, that their squares overflow).
    """
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    if not groups:
        return torch.zeros((), dtype=torch.float32, device=device)
    parts = [torch.stack(torch._foreach_norm(group, 2.0, dtype=None if dtype == torch.float64 else torch.float32))
             .square().sum().to(device=device, dtype=torch.float32)
             for (_, dtype), group in groups.items()]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


@torch.no_grad()
def scale_gradients_to_norm(grads: List[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale ``grads`` in place by ``min(1, max_norm / (total_norm + 1e-6))`` (the rule of
    ``torch.nn.utils.clip_grad_norm_``), without reading ``total_norm`` on the host: one
    ``_foreach_mul_`` per (device, dtype) group; a norm within the bound multiplies by exactly 1."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for (device, dtype), group in groups.items():
        torch._foreach_mul_(group, coef.to(device=device, dtype=dtype))


def first_nonfinite(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """Name and summary of the first floating-point tensor of ``(name, tensor)`` pairs that holds
    NaN or inf, or None. Exact, tensor by tensor: what the trainer runs once :func:`squared_norm`
    of the state came out non-finite, to name the culprit."""
    named = [(n, t) for n, t in named_tensors if t.is_floating_point() and t.numel()]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    if bool(flags.all()):
        return None
    name, tensor = named[int((~flags).nonzero()[0])]
    bad = ~torch.isfinite(tensor.detach())
    return (f"{name} (shape {tuple(tensor.shape)}: {int(bad.sum())} of {tensor.numel()} values "
            f"non-finite, {int(torch.isnan(tensor).sum())} NaN)")
