"""The reference path of the sharded margin-softmax loss (``impl="reference"``): the [global
batch x scored classes] logits materialised at once and differentiated by autograd. The chunked
path (:mod:`partial_fc.classifier.chunked`) computes the same without them. The step, with
every collective and shape: docs/ALGORITHM.md, section 5."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import all_reduce
from .numerics import compute_dtype, matmul
from .softmax import distributed_cross_entropy
from .tiles import negative_sums, stack_sums, target_mask

REDUCTIONS = ("none", "mean")


def check_reduction(reduction: str) -> None:
    """Refuse a reduction other than ``"none"`` ([rows]) and ``"mean"`` (a scalar)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reference_margin_loss(
    head, embeddings: torch.Tensor, weight: torch.Tensor, target_index: torch.Tensor,
    group=None, gemm_dtype: Optional[torch.dtype] = None, reduction: str = "none",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Margin-softmax loss of the global batch against this rank's class rows.

    ``embeddings`` [Bg, D] is the global batch (already gathered), ``weight`` [n, D] this rank's
    scored class rows, ``target_index`` [Bg] int64 the local row of each target or -1;
    ``gemm_dtype`` the cosine GEMM's input dtype (None: the working dtype, fp32 or fp64; bf16 /
    fp16 give fp32 cosines, :func:`partial_fc.classifier.numerics.matmul`). Returns the loss
    (per row, or the mean: ``reduction``; identical on all ranks) and detached per-row
    diagnostics (the head's, plus ``target_cos``). No host synchronisation.
    """
    check_reduction(reduction)
    work = compute_dtype(embeddings, weight)
    e = F.normalize(embeddings.to(work), dim=1)
    w = F.normalize(weight.to(work), dim=1)
    gemm = gemm_dtype or work
    cos = matmul(e.to(gemm), w.to(gemm).t(), work).clamp(-1.0, 1.0)
    owned = target_index >= 0
    local_target = (cos.gather(1, target_index.clamp(min=0)[:, None])[:, 0] if cos.shape[1]
                    else cos.new_zeros(cos.shape[0]))
    target_cos = all_reduce(torch.where(owned, local_target.detach(), 0.0), dist.ReduceOp.SUM,
                            group)
    prep = head.prepare(target_cos, embeddings.detach().to(work).norm(dim=1))
    stats = stack_sums(negative_sums(head, cos.detach(), prep, target_index))
    if stats is not None:
        stats = all_reduce(stats, dist.ReduceOp.SUM, group)
    # The owner's target cosine carries the gradient; the others' rows only fill the shape.
    positive = head.positive_logit(torch.where(owned, local_target, target_cos), prep, stats)
    logits = torch.where(target_mask(target_index, cos.shape[1]), positive[:, None],
                         head.negative_logits(cos, prep))
    loss = distributed_cross_entropy(logits * head.scale, target_index, group)
    diagnostics = {k: v.detach() for k, v in head.diagnostics(prep, stats).items()}
    diagnostics["target_cos"] = target_cos
    return (loss.mean() if reduction == "mean" else loss), diagnostics
