"""What one classifier step sends over the process group, message by message, without running
it: the collectives of :meth:`partial_fc.PartialFC.forward` and its backward for a given plan and
batch sizes (docs/ALGORITHM.md, section 5). The network preflight times these messages at their
own sizes; a test holds the model equal to what a real step dispatches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from .collectives import TENSOR_COLLECTIVES, transport_dtype
from .module import HEADER_FIELDS
from .numerics import compute_dtype
from .plan import StepPlan


@dataclass(frozen=True)
class Collective:
    """One collective: ``op`` (``all_gather``, ``all_reduce`` or ``reduce_scatter``) of a
    ``shape``/``dtype`` tensor per rank (all_gather: the rank's part; reduce_scatter: the whole
    input), ``count`` times in a row."""

    name: str
    op: str
    shape: tuple
    dtype: torch.dtype
    count: int = 1

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= int(n)
        return numel * torch.empty((), dtype=self.dtype).element_size()


def _chunks(rows: int, chunk_rows: int) -> List[int]:
    """Row counts of the row sweep's chunks (the last one shorter)."""
    return [min(chunk_rows, rows - start) for start in range(0, rows, chunk_rows)]


def step_collectives(plan: StepPlan, sizes: Sequence[int], embedding_size: int, num_stats: int,
                     embedding_dtype: torch.dtype = torch.float32,
                     weight_dtype: torch.dtype = torch.float32, backend: str = "gloo",
                     backward: bool = True) -> List[Collective]:
    """The collectives of one classifier forward (and its ``backward``) on ``len(sizes)`` ranks
    holding ``sizes`` rows each, in the order the step runs them; none on one rank.

    ``plan`` the step's :class:`~.plan.StepPlan`, ``num_stats`` the head's statistics per row,
    ``embedding_dtype``/``weight_dtype`` what the classifier is handed and holds (the working
    dtype follows them), ``backend`` the process group's (``"gloo"`` sends bf16 as fp32)."""
    world, rows = len(sizes), sum(sizes)
    if world < 2:
        return []
    longest = max(sizes)
    sent = transport_dtype(embedding_dtype, backend)
    work = compute_dtype(torch.empty(0, dtype=embedding_dtype), torch.empty(0, dtype=weight_dtype))
    out = [Collective("header (batch sizes, label check, tiles)", "all_gather", (1, HEADER_FIELDS),
                      torch.int64),
           Collective("embeddings", "all_gather", (longest, embedding_size), sent),
           Collective("labels", "all_gather", (longest,), torch.int64),
           Collective("target cosines", "all_reduce", (rows,), work)]
    for n in (_chunks(rows, plan.chunk_rows) if plan.chunk_rows else [rows]):
        if num_stats:
            out.append(Collective("margin statistics", "all_reduce", (n, num_stats), torch.float64))
        out += [Collective("softmax max", "all_reduce", (n,), work),
                Collective("softmax sums, target logits", "all_reduce", (2, n), work)]
    if backward:
        op = "all_reduce" if TENSOR_COLLECTIVES.get(str(backend)) is False else "reduce_scatter"
        out.append(Collective("embedding gradients", op, (world * longest, embedding_size), sent))
    return out

