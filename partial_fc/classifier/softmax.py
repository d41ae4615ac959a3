"""Softmax cross-entropy whose classes are split across ranks (docs/ALGORITHM.md, section 5)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_reduce


def _target_values(logits: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """[rows]: each row's logit at its local target column, 0 where another rank owns it."""
    if logits.shape[1] == 0:
        return logits.new_zeros(logits.shape[0])
    picked = logits.gather(1, target_index.clamp(min=0)[:, None])[:, 0]
    return torch.where(target_index >= 0, picked, torch.zeros_like(picked))


class DistributedSoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy ``log sum_k exp(z_k) - z_y`` over classes sharded across ranks.

    Each rank passes its own columns ``logits [B, n_local]`` of the same global rows and
    ``target_index [B]``: the local column of the row's target, or -1 where another rank owns it.
    Every rank gets the same per-row loss. The backward pass returns ``softmax - onehot`` for the
    local columns, which is exact as long as every rank applies the same (replicated) computation
    to the returned loss, e.g. ``loss.mean()``. No host synchronisation.
    """

    @staticmethod
    def forward(ctx, logits, target_index, group=None):
        with torch.no_grad():
            rows = logits.shape[0]
            local_max = (logits.amax(dim=1) if logits.shape[1]
                         else logits.new_full((rows,), -torch.inf))
            row_max = all_reduce(local_max, dist.ReduceOp.MAX, group)
            exp = torch.exp(logits - row_max[:, None])
            summed = all_reduce(torch.stack([exp.sum(dim=1), _target_values(logits, target_index)]),
                                dist.ReduceOp.SUM, group)
            loss = torch.log(summed[0]) + row_max - summed[1]
            probs = exp.div_(summed[0][:, None])
        ctx.save_for_backward(probs, target_index)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, target_index = ctx.saved_tensors
        grad = probs * grad_loss[:, None]
        if grad.shape[1]:
            owned = (target_index >= 0).to(grad.dtype)
            grad.scatter_add_(1, target_index.clamp(min=0)[:, None], -(grad_loss * owned)[:, None])
        return grad, None, None


def distributed_cross_entropy(
    logits: torch.Tensor, target_index: torch.Tensor, group=None
) -> torch.Tensor:
    """Per-row softmax cross-entropy over class-sharded ``logits``; see
    :class:`DistributedSoftmaxCrossEntropy`. ``group=None`` is the single-process case."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [rows, classes], got shape {tuple(logits.shape)}")
    if target_index.shape != logits.shape[:1]:
        raise ValueError(
            f"target_index shape {tuple(target_index.shape)} does not match {logits.shape[0]} rows"
        )
    return DistributedSoftmaxCrossEntropy.apply(logits, target_index, group)
