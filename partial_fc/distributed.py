"""Collectives the sharded classifier needs, usable with no process group at all.

Every helper accepts ``group=None`` meaning "single process": the collective is then the identity.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class ProcessGroupInfo:
    """The process group a module talks over, with its world size and this process's rank."""

    def __init__(self, process_group=None):
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self.group = process_group
        if process_group is None:
            self.world_size, self.rank = 1, 0
        else:
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)

    @property
    def distributed(self) -> bool:
        return self.group is not None and self.world_size > 1

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"ProcessGroupInfo(world_size={self.world_size}, rank={self.rank})"


def _needs_fp32_transport(tensor: torch.Tensor, group) -> bool:
    # gloo does not reduce bfloat16; send such tensors as float32 (exact for bf16 values).
    return tensor.dtype == torch.bfloat16 and dist.get_backend(group) == dist.Backend.GLOO


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """Return the all-reduced value of ``tensor`` (a new tensor; the input is untouched)."""
    if group is None:
        return tensor.clone()
    if _needs_fp32_transport(tensor, group):
        out = tensor.float()
        dist.all_reduce(out, op=op, group=group)
        return out.to(tensor.dtype)
    out = tensor.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def gather_sizes(local_size: int, device: torch.device, group=None) -> list[int]:
    """Leading sizes of every rank's tensor, in rank order."""
    if group is None:
        return [local_size]
    world = dist.get_world_size(group)
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """All-gather rows of possibly different counts; returns the concatenation in rank order."""
    longest = max(sizes)
    send = tensor
    transport = _needs_fp32_transport(tensor, group)
    if transport:
        send = send.float()
    if send.shape[0] != longest:
        padded = send.new_zeros((longest, *send.shape[1:]))
        padded[: send.shape[0]] = send
        send = padded
    parts = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(parts, send.contiguous(), group=group)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
    return out.to(tensor.dtype) if transport else out


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, group):
        ctx.sizes = list(sizes)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group, rank = ctx.sizes, ctx.group, ctx.rank
        longest = max(sizes)
        transport = _needs_fp32_transport(grad, group)
        work = grad.float() if transport else grad
        stacked = work.new_zeros((len(sizes), longest, *work.shape[1:]))
        offset = 0
        for r, n in enumerate(sizes):
            stacked[r, :n] = work[offset : offset + n]
            offset += n
        if dist.get_backend(group) == dist.Backend.NCCL:
            mine = work.new_empty((longest, *work.shape[1:]))
            dist.reduce_scatter_tensor(mine, stacked.view(-1, *work.shape[1:]), group=group)
        else:
            dist.all_reduce(stacked, group=group)
            mine = stacked[rank]
        mine = mine[: sizes[rank]]
        return (mine.to(grad.dtype) if transport else mine), None, None


def all_gather_rows(
    tensor: torch.Tensor, sizes: Optional[Sequence[int]] = None, group=None
) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (rank order), differentiably.

    Ranks may hold different numbers of rows; ``sizes`` (from :func:`gather_sizes`) saves a
    collective when the caller already knows them. The backward pass hands each rank the sum, over
    all ranks, of the gradient for its own rows (a reduce-scatter), which is the true gradient when
    every rank computes its share of one global loss.
    """
    if group is None:
        return tensor
    if sizes is None:
        sizes = gather_sizes(tensor.shape[0], tensor.device, group)
    if tensor.requires_grad:
        return _AllGatherRows.apply(tensor, sizes, group)
    return _gather_padded(tensor, sizes, group)
