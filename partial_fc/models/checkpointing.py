"""Activation checkpointing over backbone stages that leaves BatchNorm statistics intact.

`torch.utils.checkpoint` re-runs a stage's forward during backward. A BatchNorm layer in training
mode would then update its running mean and variance a second time for the same batch. The
recomputation is harmless to outputs and gradients (both use batch statistics), so here the
running buffers are snapshotted before every re-run and put back afterwards.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _batchnorm_buffers(module: nn.Module) -> List[torch.Tensor]:
    buffers = []
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
            buffers.extend(b for b in (sub.running_mean, sub.running_var, sub.num_batches_tracked)
                           if b is not None)
    return buffers


def checkpointed(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `stage(x)` under non-reentrant activation checkpointing.

    The first call is the real forward; any further call of the same closure is autograd's
    recomputation, whose side effects on BatchNorm buffers are undone.
    """
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1 or not stage.training:
            return stage(inp)
        buffers = _batchnorm_buffers(stage)
        saved = [b.clone() for b in buffers]
        try:
            return stage(inp)
        finally:  # also when checkpoint stops the re-run early by raising inside it
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)

    return checkpoint(run, x, use_reentrant=False)


def run_stages(stages: Iterable[nn.Module], x: torch.Tensor, use_checkpointing: bool) -> torch.Tensor:
    """Apply `stages` in order, checkpointing each one when asked and when gradients are needed."""
    use_checkpointing = use_checkpointing and torch.is_grad_enabled()
    for stage in stages:
        x = checkpointed(stage, x) if use_checkpointing else stage(x)
    return x
