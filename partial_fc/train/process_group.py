"""Process-group helpers of the training loop: the backbone's DDP wrapping with its summing
gradient hook, BatchNorm buffer agreement, and collective timeouts turned into errors that name
what the loop was doing."""
from __future__ import annotations

import contextlib
import inspect
import logging
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time: a peer hung or died."""


class SumGradients:
    """DDP communication hook that all-reduces the backbone's gradient as a *sum*.

    Every rank back-propagates the same global-batch loss through its own samples only, so the
    true gradient is the sum over ranks, not DDP's default mean.
    """

    @staticmethod
    def hook(group, bucket):
        work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(backbone: nn.Module, device: torch.device, group) -> nn.Module:
    """``backbone`` in DistributedDataParallel over ``group`` with :class:`SumGradients`; each
    rank keeps its own BatchNorm statistics between steps (as insightface does). ``group`` None:
    the backbone itself."""
    if group is None:
        return backbone
    kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    ddp = nn.parallel.DistributedDataParallel(backbone, process_group=group, **kwargs)
    ddp.register_comm_hook(group, SumGradients.hook)
    return ddp


def broadcast_buffers(module: nn.Module, group) -> None:
    """Give every rank of ``group`` its first rank's buffers of ``module`` (in place; no-op
    when ``group`` is None): one broadcast per (device, dtype) of the buffers flattened into one
    tensor, not one per buffer (a ResNet-100 has about 300)."""
    if group is None:
        return
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for buffer in module.buffers():
        groups.setdefault((buffer.device, buffer.dtype), []).append(buffer)
    src = dist.get_global_rank(group, 0)
    for buffers in groups.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=src, group=group)
        for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.copy_(value.view_as(buffer))


def leave(failed: bool) -> None:
    """End this process's part in the default process group (if any).

    After a run every rank finished, ``destroy_process_group``. After a failure of this rank,
    its peers may wait in a collective it will never join and its own last collectives may be
    in flight; destroying would wait for them (NCCL's communicator teardown can wait forever),
    so the group is aborted instead (``ncclCommAbort`` returns at once): the process exits with
    its error and torchrun or Slurm end the job. Gloo's abort, like its destroy, still waits out
    a collective of this rank's own in flight, for at most ``trainer.collective_timeout_s``.
    """
    if not dist.is_initialized():
        return
    if not failed:
        dist.destroy_process_group()
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch >= 2.6
    if abort is None:
        dist.destroy_process_group()
        return
    try:
        abort()
    except Exception as err:  # noqa: BLE001 - the run's own error is the one to report
        log.warning("aborting the process group after the failure failed too: %s", err)


def is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def timeout_error(err: BaseException, group, rank: int, world_size: int, step: int, phase: str,
                  timeout_s: Optional[float]) -> CollectiveTimeoutError:
    """Name the operation (``phase``), this rank and, where gloo can tell, the ranks that did not
    answer (a ``monitored_barrier`` probe of up to 10 s)."""
    missing = ""
    try:  # gloo only: reports which ranks fail to reach the barrier
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=10), wait_all_ranks=True)
    except Exception as probe:  # noqa: BLE001 - any failure here is informative only
        missing = f"; barrier probe: {str(probe).splitlines()[0][:300]}"
    limit = f" within {timeout_s:g}s" if timeout_s else ""
    return CollectiveTimeoutError(
        f"rank {rank}/{world_size} at step {step}: a collective in '{phase}' did "
        f"not complete{limit} (a peer hung or died; trainer.collective_timeout_s sets the limit)"
        f"{missing}. Original error: {str(err).splitlines()[0][:500]}"
    )


@contextlib.contextmanager
def named_timeouts(group, describe: Callable[[BaseException], CollectiveTimeoutError]):
    """A collective of ``group`` timing out inside becomes ``describe(err)`` (a
    :class:`CollectiveTimeoutError`); other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        if group is not None and is_timeout(err):
            raise describe(err) from err
        raise
