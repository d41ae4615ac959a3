"""Record the collectives a piece of code sends, as torch dispatches them (``c10d`` operators),
to check a model of a step's communication against the real traffic."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# c10d operator -> (our name of the collective, index of the argument holding what one rank sends)
OPERATORS = {"allgather_": ("all_gather", 1), "allreduce_": ("all_reduce", 0),
             "reduce_scatter_": ("reduce_scatter", 1), "_reduce_scatter_base_": ("reduce_scatter", 1),
             "_allgather_base_": ("all_gather", 1), "broadcast_": ("broadcast", 0)}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


class CollectiveRecorder(TorchDispatchMode):
    """``with CollectiveRecorder() as rec: ...``; ``rec.calls``: ``(op, bytes one rank sends)``
    in order (reduce_scatter: the whole input)."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func._opname in OPERATORS:
            name, index = OPERATORS[func._opname]
            self.calls.append((name, _nbytes(args[index])))
        return func(*args, **(kwargs or {}))
