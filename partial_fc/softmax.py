"""Softmax cross-entropy whose classes are split across ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import all_reduce


def _softmax_statistics(logits: torch.Tensor, target_index: torch.Tensor, group):
    """Global row max, global sum of exp(logit - max) and the target logit, per row."""
    rows = logits.shape[0]
    if logits.shape[1] > 0:
        local_max = logits.amax(dim=1)
    else:
        local_max = logits.new_full((rows,), float("-inf"))
    row_max = all_reduce(local_max, dist.ReduceOp.MAX, group)
    exp = torch.exp(logits - row_max[:, None])
    sum_exp = all_reduce(exp.sum(dim=1), dist.ReduceOp.SUM, group)
    owned = target_index >= 0
    target = logits.new_zeros(rows)
    owned_rows = owned.nonzero(as_tuple=True)[0]
    target[owned_rows] = logits[owned_rows, target_index[owned_rows]]
    target = all_reduce(target, dist.ReduceOp.SUM, group)
    return row_max, exp, sum_exp, target, owned_rows


class DistributedSoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy ``log sum_k exp(z_k) - z_y`` over classes sharded across ranks.

    Each rank passes its own columns ``logits [B, n_local]`` of the same global rows and
    ``target_index [B]``: the local column of the row's target, or -1 where another rank owns it.
    Every rank gets the same per-row loss. The backward pass returns ``softmax - onehot`` for the
    local columns, which is exact as long as every rank applies the same (replicated) computation
    to the returned loss, e.g. ``loss.mean()``.
    """

    @staticmethod
    def forward(ctx, logits, target_index, group=None):
        with torch.no_grad():
            row_max, exp, sum_exp, target, owned_rows = _softmax_statistics(
                logits, target_index, group
            )
            loss = torch.log(sum_exp) + row_max - target
            probs = exp.div_(sum_exp[:, None])
        ctx.save_for_backward(probs, target_index[owned_rows], owned_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, owned_targets, owned_rows = ctx.saved_tensors
        grad = probs * grad_loss[:, None]
        grad[owned_rows, owned_targets] -= grad_loss[owned_rows]
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
