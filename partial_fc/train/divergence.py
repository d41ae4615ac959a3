"""Whether a run can still learn: non-finite model state and runs of skipped steps."""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch


class TrainingDivergedError(RuntimeError):
    """The run cannot learn any more: its model state holds NaN/inf, or too many consecutive
    steps had a non-finite loss or gradient. No checkpoint is written after it."""


def first_nonfinite(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """Name and summary of the first floating-point tensor of ``(name, tensor)`` pairs that holds
    NaN or inf, or None. One device-to-host copy (of the flags) however many tensors there are."""
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
