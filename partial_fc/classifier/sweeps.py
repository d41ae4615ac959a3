"""The chunked path's two walks over the [global batch x scored classes] tiles, on the tile
functions of :mod:`partial_fc.classifier.tiles` (docs/ALGORITHM.md, sections 7 and 7a).

- The class sweep: blocks of classes against the whole batch; the forward gathers each row's
  running max / sum-exp and the head's sums, the backward recomputes every tile (four GEMMs).
- The row sweep: chunks of rows against every scored class of the rank; each chunk's softmax
  is complete once its tile is seen, so its gradients are formed at once (three GEMMs).

Per-row vectors cover every row of the global batch (no row lists, no host synchronisation);
a row's target column is ``target_index`` (its scored row here, or -1 where another rank owns
its class).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .collectives import all_reduce
from .numerics import NORM_EPS, add_matmul_, matmul, normalize_rows
from .tiles import stack_sums


class ScoredRows:
    """This rank's scored class rows, ``weight`` or ``weight[row_index]`` (never copied whole),
    read in the working dtype; ``work`` / ``gemm`` the working and the GEMM input dtypes."""

    def __init__(self, weight, row_index, work, gemm):
        self.weight, self.row_index, self.work, self.gemm = weight, row_index, work, gemm
        self.count = int(row_index.numel()) if row_index is not None else int(weight.shape[0])

    def raw(self, rows) -> torch.Tensor:
        """The scored rows ``rows`` (a slice or an index tensor) as stored, not normalised."""
        if self.row_index is not None:
            return self.weight.index_select(0, self.row_index[rows]).to(self.work)
        if isinstance(rows, slice):
            return self.weight[rows].to(self.work)
        return self.weight.index_select(0, rows).to(self.work)

    def put_grad(self, grad_weight, start: int, stop: int, grad: torch.Tensor) -> None:
        """Write the gradient of scored rows [start, stop) into the weight's gradient."""
        if self.row_index is None:
            grad_weight[start:stop] = grad
        else:
            grad_weight.index_add_(0, self.row_index[start:stop], grad.to(grad_weight.dtype))


class Terms(NamedTuple):
    """Per-row results of the softmax of a set of rows: ``loss``, the global ``row_max``,
    ``inv_sum`` = 1 / sum-exp, ``target_coef`` (d loss / d c_y per unit upstream gradient and
    scale, 0 where another rank owns the target or the clamp of c_y was active) and the
    all-reduced ``stats`` [rows, num_stats] float64 (None without statistics)."""

    loss: torch.Tensor
    row_max: torch.Tensor
    inv_sum: torch.Tensor
    target_coef: torch.Tensor
    stats: Optional[torch.Tensor]


def target_cosines(e_gemm, rows: ScoredRows, target_index, group):
    """(raw_target, target_cos) [Bg]: the owner's unclamped <e, w_y / |w_y|> (row-wise dot
    products with the gathered target rows, garbage on rows owned elsewhere) and every row's
    clamped c_y after the all-reduce (one non-zero contribution per row: exact)."""
    owned = target_index >= 0
    if rows.count:
        w_target, _ = normalize_rows(rows.raw(target_index.clamp(0, rows.count - 1)))
        raw = (e_gemm.to(rows.work) * w_target).sum(dim=1)
    else:
        raw = torch.zeros(e_gemm.shape[0], dtype=rows.work, device=e_gemm.device)
    local = torch.where(owned, raw.clamp(-1.0, 1.0), 0.0)
    return raw, all_reduce(local, dist.ReduceOp.SUM, group)


def _positive_and_slope(head, target_cos, prep, stats):
    """Every row's positive logit and its derivative w.r.t. the target cosine."""
    with torch.enable_grad():
        c = target_cos.detach().requires_grad_(True)
        positive = head.positive_logit(c, prep, stats)
        if c.numel() == 0 or not positive.requires_grad:
            return positive.detach(), torch.zeros_like(c)
        (slope,) = torch.autograd.grad(positive.sum(), c, allow_unused=True)
    return positive.detach(), (torch.zeros_like(c) if slope is None else slope)


def softmax_terms(head, group, neg_max, neg_sum, stats, prep, target_index, raw_target,
                  target_cos) -> Terms:
    """The positive logit joins a set of rows' negatives: global max and sum-exp, the loss.

    ``neg_max``, ``neg_sum`` [R] this rank's negatives (sum relative to the max), ``stats`` the
    head's per-row sums over them ([R, num_stats] float64 or None; all-reduced here), ``prep``
    the rows' head dict; the other
    arguments as :func:`target_cosines` gives them, for these rows. Three all-reduces."""
    work = neg_max.dtype
    owned = target_index >= 0
    if stats is None and head.num_stats:
        stats = torch.zeros(neg_max.shape[0], head.num_stats, dtype=torch.float64,
                            device=neg_max.device)
    if stats is not None:
        stats = all_reduce(stats, dist.ReduceOp.SUM, group)
    positive, slope = _positive_and_slope(head, target_cos, prep, stats)
    z = positive.to(work) * head.scale
    row_max = all_reduce(torch.where(owned, torch.maximum(neg_max, z), neg_max),
                         dist.ReduceOp.MAX, group)
    own_exp = torch.exp(z - row_max)
    local_sum = neg_sum * torch.exp(neg_max - row_max) + torch.where(owned, own_exp, 0.0)
    # The owner contributes the target logit, as the reference path's softmax does.
    summed = all_reduce(torch.stack([local_sum, torch.where(owned, z, 0.0)]), dist.ReduceOp.SUM,
                        group)
    inv_sum = 1.0 / summed[0]
    in_range = (raw_target >= -1.0) & (raw_target <= 1.0)
    coef = torch.where(owned & in_range, (own_exp * inv_sum - 1.0) * slope.to(work), 0.0)
    return Terms(torch.log(summed[0]) + row_max - summed[1], row_max, inv_sum, coef, stats)


def blocks(count: int, block: int):
    for start in range(0, count, block):
        yield start, min(start + block, count)


def block_columns(target_index, start: int, stop: int) -> torch.Tensor:
    """Each row's target column within scored rows [start, stop), or -1."""
    inside = (target_index >= start) & (target_index < stop)
    return torch.where(inside, target_index - start, -1)


def class_sweep_forward(tiles, rows: ScoredRows, e_gemm, target_index, prep, block: int):
    """(neg_max, neg_sum, stats, w_norm) of every row over this rank's negatives, block by block
    (one [Bg x block] tile at a time): ``stats`` the head's sums over them, [Bg, num_stats]
    float64 accumulated over the blocks (None without statistics), ``w_norm`` [scored] the
    rows' norms."""
    n, device = e_gemm.shape[0], e_gemm.device
    neg_max = torch.full((n,), -math.inf, dtype=rows.work, device=device)
    neg_sum = torch.zeros(n, dtype=rows.work, device=device)
    w_norm = torch.empty(rows.count, dtype=rows.work, device=device)
    # One reusable tile (fresh large allocations page-fault on CPU).
    buffer = torch.empty(n * min(block, rows.count), dtype=rows.work, device=device)
    stats = None
    for start, stop in blocks(rows.count, block):
        w_raw = rows.raw(slice(start, stop))
        w_norm[start:stop] = w_raw.norm(dim=1)
        raw = matmul(e_gemm, w_raw.to(rows.gemm).t(), rows.work,
                     out=buffer[: n * (stop - start)].view(n, stop - start))
        inv_norm = 1.0 / w_norm[start:stop].clamp_min(NORM_EPS)
        neg_max, neg_sum, sums = tiles.forward(
            raw, inv_norm, block_columns(target_index, start, stop), prep, neg_max, neg_sum)
        block_stats = stack_sums(sums)
        if block_stats is not None:
            stats = block_stats if stats is None else stats.add_(block_stats)
    return neg_max, neg_sum, stats, w_norm


def class_sweep_backward(tiles, rows: ScoredRows, e_gemm, e_scaled, w_norm, terms: Terms, prep,
                         target_index, block: int, grad_unit, grad_weight) -> None:
    """Recompute each block's tile; add its share into ``grad_unit`` [Bg, D] (the unit
    embeddings' gradient before the per-row factor) and write its rows of ``grad_weight``
    (``e_scaled``: the unit embeddings times each row's factor). Either may be None."""
    n, work, gemm = e_gemm.shape[0], rows.work, rows.gemm
    buffer = torch.empty(n * min(block, rows.count), dtype=work, device=e_gemm.device)
    grad_buffer = buffer if gemm == work else torch.empty_like(buffer, dtype=gemm)
    one = torch.ones(1, dtype=work, device=e_gemm.device)  # the row factor is in e_scaled
    for start, stop in blocks(rows.count, block):
        w_raw = rows.raw(slice(start, stop))
        w_gemm = w_raw.to(gemm)
        norm = w_norm[start:stop]
        inv_norm = 1.0 / norm.clamp_min(NORM_EPS)
        width = stop - start
        raw = matmul(e_gemm, w_gemm.t(), work, out=buffer[: n * width].view(n, width))
        grad = tiles.backward(raw, inv_norm, block_columns(target_index, start, stop),
                              terms.target_coef, prep, terms.row_max, terms.inv_sum,
                              grad_buffer[: n * width].view(n, width))
        if grad_unit is not None:
            add_matmul_(grad_unit, grad, w_gemm)
        if grad_weight is not None:
            x = matmul(grad.t(), e_scaled, work)
            tiles.project_weight_grad_(x, w_raw, inv_norm, (norm >= NORM_EPS).to(work), one)
            rows.put_grad(grad_weight, start, stop, x)
