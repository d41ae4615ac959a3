"""The model-parallel Partial FC classifier: :class:`PartialFC` (``module``) shards the class
centres, gathers the global batch and runs each step on the reference path (``reference``) or
the chunked path (``chunked``: ``sweeps``, ``row_sweep``, the tile functions of ``tiles``), as
``plan`` decides from values every rank shares; ``collectives``, ``softmax``, ``sampling``,
``sharding`` and ``numerics`` serve both paths; ``optim`` holds the row-sparse optimizers.
The step, its collectives and its formulas: docs/ALGORITHM.md, sections 4-8."""
from . import optim
from .chunked import chunked_margin_loss
from .module import GEMM_DTYPES, PartialFC
from .plan import AUTO_CHUNKED_LOGIT_BYTES, IMPLS, SWEEPS, StepPlan
from .reference import reference_margin_loss
from .sharding import shard_range
from .softmax import distributed_cross_entropy

__all__ = ["PartialFC", "StepPlan", "shard_range", "distributed_cross_entropy",
           "chunked_margin_loss", "reference_margin_loss", "optim", "IMPLS", "SWEEPS",
           "GEMM_DTYPES", "AUTO_CHUNKED_LOGIT_BYTES"]
