"""The reference path of the sharded margin-softmax loss: the [global batch x scored classes]
logits materialised at once (``impl="reference"``; the chunked path is :mod:`partial_fc.chunked`).
Also the helpers both paths share (working dtype, target cosines, negative statistics).
The step, with every collective and shape: docs/ALGORITHM.md, section 5."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from npc_head.base import select_rows

from .distributed import all_reduce
from .softmax import distributed_cross_entropy

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: statistics never run below fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def normalized_cosines(
    embeddings: torch.Tensor, weight: torch.Tensor, gemm_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """clamp(<e/|e|, w_k/|w_k|>, -1, 1) in fp32 or wider; the GEMM itself runs in ``gemm_dtype``
    (bf16/fp16 inputs keep their precision there, accumulating in fp32)."""
    work = compute_dtype(embeddings, weight)
    e = F.normalize(embeddings.to(work), dim=1)
    w = F.normalize(weight.to(work), dim=1)
    if gemm_dtype in LOW_PRECISION:
        cos = (e.to(gemm_dtype) @ w.to(gemm_dtype).t()).to(work)
    else:
        cos = e @ w.t()
    return cos.clamp(-1.0, 1.0)


def gather_target_cosines(
    local_target: torch.Tensor, owned_rows: torch.Tensor, rows: int, dtype, device, group
) -> torch.Tensor:
    """Every row's target cosine, contributed by the rank that owns the target (detached)."""
    target = torch.zeros(rows, dtype=dtype, device=device)
    target[owned_rows] = local_target.detach()
    return all_reduce(target, dist.ReduceOp.SUM, group)


def sum_negative_stats(local_stats, target_stats, owned_rows, group):
    """All-reduced per-row statistics over every rank's negatives (target column removed)."""
    if local_stats is None:
        return None
    local_stats = local_stats.index_add(0, owned_rows, target_stats, alpha=-1)
    return all_reduce(local_stats, dist.ReduceOp.SUM, group)


def reference_margin_loss(
    head, embeddings: torch.Tensor, weight: torch.Tensor, target_index: torch.Tensor, group=None
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-row margin-softmax loss of the global batch against this rank's class rows.

    ``embeddings`` [Bg, D] is the global batch (already gathered), ``weight`` [n, D] this rank's
    scored class rows, ``target_index`` [Bg] the local row of each target or -1. Returns the
    per-row loss (identical on all ranks) and detached per-row diagnostics.
    """
    cos = normalized_cosines(embeddings, weight, embeddings.dtype)
    owned_rows = (target_index >= 0).nonzero(as_tuple=True)[0]
    owned_cols = target_index[owned_rows]
    local_target = cos[owned_rows, owned_cols]
    target_cos = gather_target_cosines(
        local_target, owned_rows, cos.shape[0], cos.dtype, cos.device, group
    )
    prep = head.prepare(target_cos)
    owned_prep = select_rows(prep, owned_rows)
    local_stats = head.negative_stats(cos, prep)
    target_stats = (
        head.negative_stats(local_target.detach()[:, None], owned_prep)
        if local_stats is not None
        else None
    )
    stats = sum_negative_stats(local_stats, target_stats, owned_rows, group)
    owned_stats = stats[owned_rows] if stats is not None else None
    positive = head.positive_logit(local_target, owned_prep, owned_stats)
    logits = head.negative_logits(cos, prep).index_put((owned_rows, owned_cols), positive)
    loss = distributed_cross_entropy(logits * head.scale, target_index, group)
    diagnostics = {k: v.detach() for k, v in head.diagnostics(prep, stats).items()}
    diagnostics["target_cos"] = target_cos
    return loss, diagnostics
