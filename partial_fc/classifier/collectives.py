"""Collectives the sharded classifier needs, usable with no process group at all.

Every helper accepts ``group=None`` meaning "single process": the collective is then the
identity. Rows of every rank travel in one tensor (``all_gather_single`` /
``reduce_scatter_single``, torch's ``all_gather_into_tensor`` / ``reduce_scatter_tensor``),
padded to the longest rank when the ranks' row counts differ; a backend without those
collectives falls back to the list forms (``TENSOR_COLLECTIVES``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

# The profiler label of the classifier's host reads (tests count them: docs/ALGORITHM.md, 5b).
HOST_READ = "partial_fc::host_read"
# What torch.profiler shows of a host synchronisation on CPU, where nothing waits (CUDA's sync
# debug mode sees them all): item/bool/int/float of a tensor, the classifier's marked reads, and
# the operations whose output size depends on the data (a wait on CUDA).
HOST_SYNC_EVENTS = frozenset({"aten::_local_scalar_dense", HOST_READ, "aten::nonzero",
                              "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
                              "aten::masked_select"})

# Backend name -> whether it has the single-tensor all-gather and reduce-scatter. Filled at the
# first use (a backend that lacks them refuses the call on every rank alike); set an entry to
# False to use the list forms.
TENSOR_COLLECTIVES: Dict[str, bool] = {}
# The single-tensor collectives by their names in this torch and in older ones.
_SINGLE_TENSOR = {"all_gather": ("all_gather_single", "all_gather_into_tensor"),
                  "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor")}


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


def host_values(tensor: torch.Tensor) -> list:
    """``tensor.tolist()``: a device-to-host copy and wait, the one kind of host synchronisation
    the classifier does, each marked ``HOST_READ`` for the profiler."""
    with torch.profiler.record_function(HOST_READ):
        return tensor.tolist()


def transport_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """The dtype a tensor of ``dtype`` travels in over ``backend``: gloo does not reduce
    bfloat16, so such tensors go as float32 (exact for bf16 values)."""
    return torch.float32 if dtype == torch.bfloat16 and str(backend) == dist.Backend.GLOO else dtype


def _needs_fp32_transport(tensor: torch.Tensor, group) -> bool:
    return transport_dtype(tensor.dtype, dist.get_backend(group)) != tensor.dtype


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """Return the all-reduced value of ``tensor`` (a new tensor; the input is untouched)."""
    if group is None:
        return tensor.clone()
    out = tensor.float() if _needs_fp32_transport(tensor, group) else tensor.clone()
    dist.all_reduce(out, op=op, group=group)
    return out.to(tensor.dtype)


def _tensor_collective(name: str, out: torch.Tensor, send: torch.Tensor, group) -> bool:
    """Run the single-tensor collective ``name`` (out of ``send``); False when this backend
    lacks it (remembered in ``TENSOR_COLLECTIVES``), so the caller takes the list form."""
    backend = str(dist.get_backend(group))
    if not TENSOR_COLLECTIVES.get(backend, True):
        return False
    function = next(getattr(dist, n) for n in _SINGLE_TENSOR[name] if hasattr(dist, n))
    try:
        function(out, send, group=group)
    except (RuntimeError, NotImplementedError):
        if backend in TENSOR_COLLECTIVES:
            raise
        TENSOR_COLLECTIVES[backend] = False
        return False
    TENSOR_COLLECTIVES[backend] = True
    return True


def _padded(tensor: torch.Tensor, longest: int) -> torch.Tensor:
    if tensor.shape[0] == longest:
        return tensor.contiguous()
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def gather_rows(tensor: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Every rank's rows of ``tensor`` concatenated in rank order (not differentiable);
    ``sizes`` the ranks' row counts."""
    if group is None:
        return tensor
    world, longest = len(sizes), max(sizes)
    transport = _needs_fp32_transport(tensor, group)
    send = _padded(tensor.float() if transport else tensor, longest)
    out = send.new_empty((world * longest, *send.shape[1:]))
    if not _tensor_collective("all_gather", out, send, group):
        dist.all_gather(list(out.chunk(world)), send, group=group)
    if min(sizes) != longest:
        out = torch.cat([part[:n] for part, n in zip(out.chunk(world), sizes)])
    return out.to(tensor.dtype) if transport else out


def _reduce_scatter_rows(grad: torch.Tensor, sizes: Sequence[int], rank: int,
                         group) -> torch.Tensor:
    """This rank's rows of the sum over ranks of ``grad`` [sum(sizes), ...]."""
    world, longest = len(sizes), max(sizes)
    transport = _needs_fp32_transport(grad, group)
    work = grad.float() if transport else grad
    if min(sizes) == longest:
        stacked = work.contiguous()
    else:
        stacked = work.new_zeros((world * longest, *work.shape[1:]))
        for r, part in enumerate(work.split(list(sizes))):
            stacked[r * longest: r * longest + sizes[r]] = part
    mine = work.new_empty((longest, *work.shape[1:]))
    if not _tensor_collective("reduce_scatter", mine, stacked, group):
        dist.all_reduce(stacked, group=group)
        mine = stacked[rank * longest: (rank + 1) * longest]
    mine = mine[: sizes[rank]]
    return mine.to(grad.dtype) if transport else mine


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, sizes, group):
        ctx.sizes, ctx.group, ctx.rank = list(sizes), group, dist.get_rank(group)
        return gather_rows(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group), None, None


def all_gather_rows(tensor: torch.Tensor, sizes: Optional[Sequence[int]] = None,
                    group=None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (rank order), differentiably.

    Ranks may hold different numbers of rows: ``sizes``, every rank's in rank order (None:
    gathered here, one more all-gather and host read). The
    backward pass hands each rank the sum, over all ranks, of the gradient for its own rows (a
    reduce-scatter), which is the true gradient when every rank computes its share of one
    global loss.
    """
    if group is None:
        return tensor
    if sizes is None:
        sizes = [row[0] for row in gather_header(torch.full((1,), tensor.shape[0],
                                                            device=tensor.device), group)]
    if tensor.requires_grad:
        return _AllGatherRows.apply(tensor, sizes, group)
    return gather_rows(tensor, sizes, group)


def gather_header(values: torch.Tensor, group=None) -> List[List[int]]:
    """Every rank's small int64 vector ``values`` [k], as host ints per rank (rank order): one
    all-gather and one host read (:func:`host_values`)."""
    world = 1 if group is None else dist.get_world_size(group)
    rows = gather_rows(values.to(torch.int64)[None], [1] * world, group)
    return host_values(rows)
