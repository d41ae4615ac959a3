"""The sharded margin-softmax loss without the [global batch x classes] logits
(``impl="chunked"``): same contract and results as
:func:`partial_fc.classifier.reference.reference_margin_loss`, one tile at a time.

Forward: every owned row's target cosine comes first (a row-wise dot product with the gathered
target rows, all-reduced), so ``head.prepare`` is known before any tile is seen; then one sweep
(:mod:`partial_fc.classifier.sweeps`: blocks of classes; :mod:`partial_fc.classifier.row_sweep`:
chunks of rows) gathers the head's sums and the running max / sum-exp of the negative logits;
the positive logit joins, and the loss. Backward takes the row sweep's gradients, or recomputes
the class sweep's tiles, and chains them through the normalisations by hand. The algorithm step
by step, with its sources: docs/ALGORITHM.md, section 7.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .numerics import compute_dtype, normalize_backward, normalize_rows, resolve_gemm_dtype
from .plan import StepPlan, plan_step
from .reference import check_reduction
from .row_sweep import project_rows_, row_sweep
from .sweeps import (ScoredRows, Terms, class_sweep_backward, class_sweep_forward,
                     softmax_terms, target_cosines)
from .tiles import Tiles


class _ChunkedMarginLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, target_index, row_index, head, group, plan, gemm, tiles,
                side, mean, grad_enabled):
        work = compute_dtype(embeddings, weight)
        rows = ScoredRows(weight, row_index, work, gemm)
        e_unit, e_norm = normalize_rows(embeddings.to(work))
        e_gemm = e_unit.to(gemm)
        raw_target, target_cos = target_cosines(e_gemm, rows, target_index, group)
        prep = head.prepare(target_cos, e_norm)
        ctx.precomputed = None
        if plan.chunk_rows:
            # needs_input_grad says True under no_grad too: the caller's grad mode decides. The
            # weight side is a sum over rows, valid for the one upstream gradient of a mean.
            need_e = grad_enabled and ctx.needs_input_grad[0]
            need_w = grad_enabled and ctx.needs_input_grad[1] and mean
            swept = row_sweep(tiles, head, rows, group, e_unit, e_gemm, target_index, prep,
                              raw_target, target_cos, plan.chunk_rows, need_e, need_w)
            terms, w_norm = swept.terms, swept.w_norm
            ctx.precomputed = (swept.grad_unit, swept.grad_rows)
        else:
            neg_max, neg_sum, stats, w_norm = class_sweep_forward(
                tiles, rows, e_gemm, target_index, prep, plan.block_size)
            terms = softmax_terms(head, group, neg_max, neg_sum, stats, prep, target_index,
                                  raw_target, target_cos)
        side.update(prep=prep, stats=terms.stats, target_cos=target_cos)
        ctx.head, ctx.prep, ctx.tiles, ctx.plan, ctx.mean = head, prep, tiles, plan, mean
        ctx.work, ctx.gemm, ctx.embedding_dtype = work, gemm, embeddings.dtype
        ctx.save_for_backward(e_unit, e_norm, weight, row_index, target_index, w_norm,
                              *terms[:4])
        ctx.has_row_index = row_index is not None
        return terms.loss.mean() if mean else terms.loss

    @staticmethod
    def backward(ctx, grad_loss):
        (e_unit, e_norm, weight, row_index, target_index, w_norm, *saved) = ctx.saved_tensors
        terms = Terms(*saved, None)
        rows = ScoredRows(weight, row_index if ctx.has_row_index else None, ctx.work, ctx.gemm)
        upstream = (grad_loss.to(ctx.work) / e_unit.shape[0]).expand(e_unit.shape[0]) if ctx.mean \
            else grad_loss.to(ctx.work)
        need_e, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_unit = grad_weight = None
        if ctx.precomputed is not None:  # the row sweep's, per unit upstream gradient
            grad_unit, grad_rows = ctx.precomputed
            ctx.precomputed = None  # a retained graph's next backward forms them again
            if grad_unit is not None:
                grad_unit.mul_(upstream[:, None])
            if grad_rows is not None:
                grad_rows = project_rows_(ctx.tiles, rows, grad_rows, w_norm, upstream[:1])
                grad_weight = _weight_grad_of_rows(grad_rows, weight, rows)
        redo_e, redo_w = need_e and grad_unit is None, need_w and grad_weight is None
        if redo_e or redo_w:
            # d loss / d cos_ik = upstream_i * s * (the tile): the per-row factor multiplies the
            # [rows x D] operands and results, never the tile.
            row_scale = upstream * ctx.head.scale
            e_scaled = (e_unit * row_scale[:, None]).to(ctx.gemm) if redo_w else None
            unit = torch.zeros_like(e_unit) if redo_e else None
            if redo_w:  # every row is written unless only the rows of row_index are scored
                grad_weight = (torch.zeros_like if ctx.has_row_index else torch.empty_like)(weight)
            class_sweep_backward(ctx.tiles, rows, e_unit.to(ctx.gemm), e_scaled, w_norm, terms,
                                 ctx.prep, target_index, ctx.plan.block_size, unit,
                                 grad_weight if redo_w else None)
            if redo_e:
                grad_unit = unit.mul_(row_scale[:, None])
        grad_embeddings = None
        if grad_unit is not None and need_e:
            grad_embeddings = normalize_backward(grad_unit, e_unit, e_norm).to(ctx.embedding_dtype)
        return (grad_embeddings, grad_weight if need_w else None) + (None,) * 10


def _weight_grad_of_rows(grad_rows, weight, rows: ScoredRows):
    """The weight's gradient in its dtype and shape from the scored rows' gradient (working
    dtype, already scaled): the scored rows take it, the others are zero."""
    if rows.row_index is None:
        return grad_rows.to(weight.dtype)
    return torch.zeros_like(weight).index_copy_(0, rows.row_index, grad_rows.to(weight.dtype))


def chunked_margin_loss(
    head, embeddings: torch.Tensor, weight: torch.Tensor, target_index: torch.Tensor,
    group=None, block_size: Optional[int] = None, row_index: Optional[torch.Tensor] = None,
    gemm_dtype: Optional[torch.dtype] = None, tiles: Optional[Tiles] = None, sweep: str = "auto",
    chunk_rows: Optional[int] = None, plan: Optional[StepPlan] = None, reduction: str = "none",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Margin-softmax loss of the global batch against this rank's class rows, one tile at a
    time.

    Same contract as :func:`partial_fc.classifier.reference.reference_margin_loss`:
    ``embeddings`` [Bg, D] the global batch, ``weight`` [n, D] this rank's class rows,
    ``target_index`` [Bg] the local row of each target or -1; returns the loss (per row, or the
    mean: ``reduction``) and detached per-row diagnostics (the head's, plus ``target_cos``).

    ``row_index`` scores the rows ``weight[row_index]`` (Partial FC's sample) without copying
    them (``target_index`` then indexes into ``row_index``; the weight's gradient is zero
    elsewhere); ``gemm_dtype`` the GEMM input dtype (:func:`resolve_gemm_dtype`); ``tiles`` a
    :class:`partial_fc.classifier.tiles.Tiles` of ``head`` (None: its functions eagerly).

    ``plan`` (:func:`partial_fc.classifier.plan.plan_step`) says how to walk the tiles; with a
    process group it must be the one every rank holds (``PartialFC`` forms it). Without a
    group, ``sweep`` / ``block_size`` / ``chunk_rows`` form it here: ``"classes"`` (blocks of
    classes, each tile recomputed in backward: four GEMMs), ``"rows"`` (chunks of rows against
    every class, gradients formed in the forward: three GEMMs), ``"auto"`` (rows when ``tiles``
    run compiled and a chunk fits the device's budget). With ``reduction="none"`` the row sweep
    leaves the weight gradient to the class sweep in backward (rows may weigh differently).

    Raises ValueError for shapes that do not match, a ``row_index`` that is not 1-D int64,
    ``tiles`` of another head, bad sizes or names, or a group without a ``plan``.
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"embeddings [rows, D] and weight [classes, D] expected, got "
                         f"{tuple(embeddings.shape)} and {tuple(weight.shape)}")
    if target_index.shape != embeddings.shape[:1]:
        raise ValueError(f"target_index shape {tuple(target_index.shape)} does not match "
                         f"{embeddings.shape[0]} rows")
    if row_index is not None and (row_index.dim() != 1 or row_index.dtype != torch.int64):
        raise ValueError(f"row_index must be a 1-D int64 tensor, got {row_index.dtype} "
                         f"of shape {tuple(row_index.shape)}")
    if tiles is not None and tiles.head is not head:
        raise ValueError("tiles were built for another head than the one given")
    check_reduction(reduction)
    tiles = tiles or Tiles(head, compile=False)
    if plan is None:
        if group is not None:
            raise ValueError("with a process group, pass the plan every rank shares (plan=)")
        scored = int(row_index.numel()) if row_index is not None else int(weight.shape[0])
        plan = plan_step("chunked", sweep, embeddings.shape[0], scored, embeddings.device,
                         tiles.active, block_size, chunk_rows)
    tiles = tiles.as_planned(plan.compiled)
    side: Dict[str, object] = {}
    gemm = resolve_gemm_dtype(embeddings, compute_dtype(embeddings, weight), gemm_dtype)
    # The function picks every dtype itself: autocast would recast its fp32 statistics.
    with torch.autocast(embeddings.device.type, enabled=False):
        loss = _ChunkedMarginLoss.apply(embeddings, weight, target_index, row_index, head, group,
                                        plan, gemm, tiles, side, reduction == "mean",
                                        torch.is_grad_enabled())
    diagnostics = {k: v.detach() for k, v in head.diagnostics(side["prep"], side["stats"]).items()}
    diagnostics["target_cos"] = side["target_cos"]
    return loss, diagnostics
