"""The sharded margin-softmax loss computed block by block over this rank's classes.

Same contract and results as :func:`partial_fc.reference.reference_margin_loss`, but the
[global batch x classes] logits never exist: only one [global batch x block] tile at a time.

Forward (one sweep over the class blocks):

1. every owned row's target cosine c_y is computed directly from the gathered target rows of the
   weight (a row-wise dot product) and all-reduced, so ``head.prepare`` (NPCFace's threshold tau)
   is known before the sweep;
2. per block: the cosine tile (the GEMM of the normalised embeddings with this block's rows,
   normalised on the fly: no normalised copy of the weight is ever written), the head's per-row
   negative statistics (they are sums, so they add over blocks) and a running log-sum-exp of the
   scaled negative logits (a hard negative's logit depends on tau only, not on NPCFace's m_i);
3. statistics are all-reduced, the positive logit (which needs m_i) joins the running max and
   sum-exp, and those are all-reduced.

Backward recomputes each tile, forms d loss / d cosine from the saved per-row log-sum-exp (the
head's ``negative_softmax_slope``), and feeds the two gradient GEMMs: the normalised-embedding gradient accumulates over blocks and each
block's weight gradient is written once, both chained through the normalisations by hand.
The algorithm step by step, with its sources: docs/ALGORITHM.md, section 7.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from npc_head.base import select_rows, stack_sums

from .distributed import all_reduce
from .fused_tiles import FusedTiles
from .reference import LOW_PRECISION, compute_dtype, gather_target_cosines

# F.normalize's default floor on the norm; the chunked path reproduces it exactly.
NORM_EPS = 1e-12

# Default tile budget (elements of one [rows x block] tile) per device type. CPU: 4M elements
# (4096 classes at Bg=1024) measured best on a 2-core machine (bench/RESULTS.md); smaller blocks
# cost little single-threaded but pay a thread-pool barrier per operation. CUDA: 64K classes at
# Bg=1024 (a 256 MiB fp32 tile; the feasibility probe in bench/RESULTS.md used 128K-256K),
# leaving room for weight, gradient and momentum within the 8 GiB target at 1M classes.
DEFAULT_TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


# The row sweep (three GEMMs, no recomputed tile) holds a [chunk rows x scored classes] tile.
# Its budget per device type, and the fewest rows a chunk may have: thin chunks make thin GEMMs
# and re-read the weight gradient (accumulated over the chunks, one read and write of
# [classes x D] each). On 2 CPU cores at 100K classes, D 512, the three GEMMs of a step in chunks
# of 32 / 64 / 128 / 256 / 512 rows took 2.2-2.5 / 1.4-1.65 / 1.2-1.3 / 1.2-1.3 / 1.0-1.1x the
# class-block floor (bench/row_chunks.py, bench/RESULTS.md), where the class sweep's four GEMMs
# are 1.33x: 128 rows at least.
# A GPU (about 200 flops per byte of memory traffic) hides the re-read only behind one chunk of
# the whole batch.
ROW_TILE_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 26}
MIN_CHUNK_ROWS = {"cpu": 128}
SWEEPS = ("auto", "rows", "classes")


def row_chunk_size(rows: int, classes: int, device: torch.device, minimum: bool = True) -> int:
    """Rows per chunk of the row sweep for a global batch of ``rows`` against ``classes`` scored
    classes (the most any rank scores), balanced over the chunks, within the device's tile
    budget (``ROW_TILE_ELEMENTS``; at least one row). With ``minimum``, 0 when that chunk would
    have fewer rows than the device's minimum (``MIN_CHUNK_ROWS``, or ``rows`` when fewer;
    elsewhere the whole batch),
    where the class sweep is the faster one."""
    kind = torch.device(device).type
    budget = ROW_TILE_ELEMENTS.get(kind, ROW_TILE_ELEMENTS["cuda"])
    rows = max(1, int(rows))
    fit = max(1, min(rows, budget // max(1, int(classes))))
    if minimum and fit < min(rows, MIN_CHUNK_ROWS.get(kind, rows)):
        return 0
    chunks = -(-rows // fit)
    return -(-rows // chunks)


def default_block_size(rows: int, device: torch.device) -> int:
    """Classes per block so that one [rows x block] tile holds about the device's tile budget."""
    budget = DEFAULT_TILE_ELEMENTS.get(torch.device(device).type, DEFAULT_TILE_ELEMENTS["cuda"])
    return max(256, budget // max(1, int(rows)))


def resolve_gemm_dtype(embeddings: torch.Tensor, work: torch.dtype, gemm_dtype=None) -> torch.dtype:
    """The GEMM's input dtype: explicit, else the active autocast dtype on this device, else the
    embeddings' own dtype when it is bf16/fp16, else the (fp32/fp64) working dtype."""
    if gemm_dtype is not None:
        return gemm_dtype
    device_type = embeddings.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if embeddings.dtype in LOW_PRECISION:
        return embeddings.dtype
    return work


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, out=None) -> torch.Tensor:
    """a @ b with the result in ``out_dtype`` (written into ``out`` when given and of that dtype);
    bf16/fp16 inputs accumulate in fp32 and, on CUDA, the product is written in fp32 directly
    instead of being rounded to bf16 first."""
    if a.dtype in LOW_PRECISION:
        if a.is_cuda:  # pragma: no cover - CUDA only
            try:
                return torch.mm(a, b, out_dtype=torch.float32).to(out_dtype)
            except (RuntimeError, TypeError):
                pass
        return (a @ b).to(out_dtype)
    if out is not None and out.dtype == a.dtype == out_dtype:
        return torch.mm(a, b, out=out)
    return (a @ b).to(out_dtype)


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b (in place when the dtypes allow, else through an fp32 product)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += _matmul(a, b, acc.dtype)


def _tile_buffer(rows: int, blocks: "_Blocks", device) -> torch.Tensor:
    """One reusable [rows x block] buffer (fresh large allocations page-fault on CPU)."""
    return torch.empty(rows * min(blocks.block_size, blocks.count), dtype=blocks.work, device=device)


def _tile(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buffer[: rows * cols].view(rows, cols)


class _Blocks:
    """This rank's scored class rows, block by block, and where the owned targets fall."""

    def __init__(self, weight, row_index, target_index, block_size, work, gemm):
        self.weight, self.row_index = weight, row_index
        self.work, self.gemm = work, gemm
        self.count = int(row_index.numel()) if row_index is not None else int(weight.shape[0])
        self.block_size = int(block_size)
        self.owned_rows = (target_index >= 0).nonzero(as_tuple=True)[0]
        self.owned_cols = target_index[self.owned_rows]

    def ranges(self):
        for start in range(0, self.count, self.block_size):
            yield start, min(start + self.block_size, self.count)

    def raw_rows(self, local: slice | torch.Tensor) -> torch.Tensor:
        """The given scored rows as stored (not normalised), in the working dtype."""
        if self.row_index is None:
            rows = self.weight[local] if isinstance(local, slice) else self.weight.index_select(0, local)
        else:
            rows = self.weight.index_select(0, self.row_index[local])
        return rows.to(self.work)

    def unit_rows(self, local: slice | torch.Tensor):
        """(w/|w| in the working dtype, the same in the GEMM dtype, |w|) of the given scored rows.

        Only this block's rows are normalised (a [block x D] temporary, cheaper than scaling the
        [rows x block] tile whenever D < rows); the weight itself is never copied whole."""
        rows = self.raw_rows(local)
        unit, norm = _normalize_rows(rows)
        return unit, (unit if self.gemm == self.work else unit.to(self.gemm)), norm

    def target_columns(self, start: int, stop: int, rows: int):
        """([rows] int64: each row's target column within [start, stop) or -1, the owned
        positions whose target falls there)."""
        which, t_rows, t_cols = self.targets_in(start, stop)
        column = torch.full((rows,), -1, dtype=torch.int64, device=self.owned_rows.device)
        column[t_rows] = t_cols
        return column, which

    def put_weight_grad(self, grad_weight: torch.Tensor, start: int, stop: int, grad: torch.Tensor):
        """Write the gradient of scored rows [start, stop) into the weight's gradient (only the
        sampled rows are touched when scoring ``weight[row_index]``)."""
        if self.row_index is None:
            grad_weight[start:stop] = grad
        else:
            grad_weight.index_add_(0, self.row_index[start:stop], grad.to(grad_weight.dtype))

    def targets_in(self, start: int, stop: int):
        """(owned positions, rows, columns within the block) of the targets in [start, stop)."""
        inside = ((self.owned_cols >= start) & (self.owned_cols < stop)).nonzero(as_tuple=True)[0]
        return inside, self.owned_rows[inside], self.owned_cols[inside] - start


def _normalize_rows(x: torch.Tensor):
    """(x / max(|x|, eps), |x|) row-wise, as F.normalize computes it."""
    norm = x.norm(dim=1)
    return x / norm.clamp_min(NORM_EPS)[:, None], norm


def _normalize_backward(grad_unit: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor):
    """Gradient w.r.t. x of x / max(|x|, eps) given the gradient w.r.t. the result."""
    inv = 1.0 / norm.clamp_min(NORM_EPS)
    radial = (unit * grad_unit).sum(dim=1, keepdim=True)
    projected = grad_unit - unit * radial * (norm >= NORM_EPS)[:, None].to(unit.dtype)
    return projected * inv[:, None]


def _clamp_unit_(cos: torch.Tensor) -> Optional[torch.Tensor]:
    """Clamp to [-1, 1] in place; returns where it clamped (None when nothing was outside,
    checked with one read pass, the usual case)."""
    if cos.numel() == 0:
        return None
    low, high = torch.aminmax(cos)
    if bool(low >= -1.0) and bool(high <= 1.0):
        return None
    outside = (cos < -1.0) | (cos > 1.0)
    cos.clamp_(-1.0, 1.0)
    return outside


def _positive_and_slope(head, target_cos, prep, stats):
    """The owned rows' positive logits and their derivative w.r.t. the target cosine."""
    with torch.enable_grad():
        c = target_cos.detach().requires_grad_(True)
        positive = head.positive_logit(c, prep, stats)
        if c.numel() == 0 or not positive.requires_grad:
            return positive.detach(), torch.zeros_like(c)
        (slope,) = torch.autograd.grad(positive.sum(), c, allow_unused=True)
    return positive.detach(), (torch.zeros_like(c) if slope is None else slope)


def _eager_forward_sweep(head, blocks, e_gemm, prep, w_norm, neg_max, neg_sum):
    """The forward sweep with the head's tile methods, one torch operation (one pass) at a time
    (``fused=False``). Fills ``w_norm``; returns (neg_max, neg_sum, summed stats or None)."""
    rows, work, stats = e_gemm.shape[0], blocks.work, None
    buffer = _tile_buffer(rows, blocks, e_gemm.device)
    for start, stop in blocks.ranges():
        _, w_gemm, w_norm[start:stop] = blocks.unit_rows(slice(start, stop))
        cos = _matmul(e_gemm, w_gemm.t(), work, out=_tile(buffer, rows, stop - start))
        _clamp_unit_(cos)
        which, t_rows, t_cols = blocks.targets_in(start, stop)
        target_vals = cos[t_rows, t_cols]
        block_stats, logits = head.negative_stats_and_logits(cos, prep)
        if block_stats is not None:
            if which.numel():
                own = head.negative_stats(target_vals[:, None], select_rows(prep, t_rows))
                block_stats.index_add_(0, t_rows, own, alpha=-1)
            stats = block_stats if stats is None else stats.add_(block_stats)
        logits[t_rows, t_cols] = -math.inf
        new_max = torch.maximum(neg_max, logits.amax(dim=1))
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        neg_sum.mul_(torch.exp(neg_max - shift)).add_(
            logits.sub_(shift[:, None]).exp_().sum(dim=1)
        )
        neg_max = new_max
    return neg_max, neg_sum, stats


def _fused_forward_sweep(tiles, blocks, e_gemm, prep, w_norm, neg_max, neg_sum):
    """The forward sweep with one fused pass per tile (:func:`partial_fc.fused_tiles.forward_tile`)
    on the raw GEMM tile of the unnormalised weight rows; same returns as the eager sweep."""
    rows, work, stats = e_gemm.shape[0], blocks.work, None
    buffer = _tile_buffer(rows, blocks, e_gemm.device)
    for start, stop in blocks.ranges():
        w_raw = blocks.raw_rows(slice(start, stop))
        w_norm[start:stop] = w_raw.norm(dim=1)
        inv_norm = 1.0 / w_norm[start:stop].clamp_min(NORM_EPS)
        raw = _matmul(e_gemm, w_raw.to(blocks.gemm).t(), work, out=_tile(buffer, rows, stop - start))
        target_col, _ = blocks.target_columns(start, stop, rows)
        neg_max, neg_sum, sums = tiles.forward(raw, inv_norm, target_col, prep, neg_max, neg_sum)
        block_stats = stack_sums(sums)
        if block_stats is not None:
            stats = block_stats if stats is None else stats.add_(block_stats)
    return neg_max, neg_sum, stats


def _eager_backward_sweep(head, blocks, prep, e_gemm, e_scaled, w_norm, row_max, target_coef,
                          grad_unit, grad_weight):
    """Backward sweep with the head's tile methods (``fused=False``): adds each block's share
    into ``grad_unit`` (the unit embeddings' gradient, before the per-row factor) and writes its
    rows of ``grad_weight``; either may be None (not needed)."""
    rows, work, gemm = e_gemm.shape[0], blocks.work, blocks.gemm
    buffer = _tile_buffer(rows, blocks, e_gemm.device)
    for start, stop in blocks.ranges():
        w_unit, w_gemm, _ = blocks.unit_rows(slice(start, stop))
        cos = _matmul(e_gemm, w_gemm.t(), work, out=_tile(buffer, rows, stop - start))
        outside = _clamp_unit_(cos)
        grad = head.negative_softmax_slope(cos, prep, row_max)
        if outside is not None:
            grad.masked_fill_(outside, 0.0)  # the clamp passes no gradient there
        which, t_rows, t_cols = blocks.targets_in(start, stop)
        grad[t_rows, t_cols] = target_coef[which]
        del cos, outside
        grad_gemm = grad.to(gemm)
        if grad_unit is not None:
            _add_matmul_(grad_unit, grad_gemm, w_gemm)
        if grad_weight is not None:
            grad_w_unit = _matmul(grad_gemm.t(), e_scaled, work)
            norm = w_norm[start:stop]
            radial = (w_unit * grad_w_unit).sum(dim=1, keepdim=True)
            keep = (norm >= NORM_EPS)[:, None].to(work)  # F.normalize's eps branch
            grad_w = (grad_w_unit - w_unit * (radial * keep)) / norm.clamp_min(NORM_EPS)[:, None]
            blocks.put_weight_grad(grad_weight, start, stop, grad_w)
        del grad, grad_gemm


def _fused_backward_sweep(tiles, head, blocks, prep, e_gemm, e_scaled, w_norm, row_max,
                          target_coef, grad_unit, grad_weight):
    """Backward sweep with one fused pass per tile (:func:`partial_fc.fused_tiles.backward_tile`).

    The tile it returns is G / |w_k| (G the eager sweep's gradient tile), so both GEMMs run
    against the raw weight rows: ``grad_unit += (G/|w|) @ w`` and, with X = (G/|w|)^T @ e_scaled
    = g_k / |w_k|, the raw rows' gradient of w / max(|w|, eps) is X - w (w . X) / |w|^2 (the
    projection dropped where |w| < eps, as F.normalize's floor)."""
    rows, work, gemm = e_gemm.shape[0], blocks.work, blocks.gemm
    buffer = _tile_buffer(rows, blocks, e_gemm.device)
    grad_buffer = buffer if gemm == work else torch.empty_like(buffer, dtype=gemm)
    for start, stop in blocks.ranges():
        w_raw = blocks.raw_rows(slice(start, stop))
        w_gemm = w_raw.to(gemm)
        norm = w_norm[start:stop]
        inv_norm = 1.0 / norm.clamp_min(NORM_EPS)
        raw = _matmul(e_gemm, w_gemm.t(), work, out=_tile(buffer, rows, stop - start))
        target_col, which = blocks.target_columns(start, stop, rows)
        coef = torch.zeros(rows, dtype=work, device=raw.device)
        coef[blocks.owned_rows[which]] = target_coef[which]
        grad_gemm = tiles.backward(raw, inv_norm, target_col, coef, prep, row_max,
                                   _tile(grad_buffer, rows, stop - start))
        if grad_unit is not None:
            _add_matmul_(grad_unit, grad_gemm, w_gemm)
        if grad_weight is not None:
            x = _matmul(grad_gemm.t(), e_scaled, work)
            keep = (norm >= NORM_EPS).to(work)
            radial = (w_raw * x).sum(dim=1) * inv_norm * inv_norm * keep
            blocks.put_weight_grad(grad_weight, start, stop, x.sub_(w_raw * radial[:, None]))


def _softmax_terms(head, group, neg_max, neg_sum, stats, prep, owned, local_target, raw_target):
    """Step 3 for a set of rows: the positive logit joins, global max and sum-exp, the loss.

    ``neg_max``, ``neg_sum`` [R] this rank's negatives (sum relative to the max), ``stats`` their
    [R, num_stats] sums or None (all-reduced here), ``prep`` the rows' head dict, ``owned`` the
    positions among the R rows whose target this rank holds, ``local_target`` / ``raw_target``
    their clamped / raw target cosines. Returns (loss, row_max, sum_exp, target_coef, stats):
    per row, and ``target_coef`` per owned row (d loss / d c_y per unit upstream gradient and
    scale, times sum_exp, through the clamp of c_y)."""
    rows, work, device = neg_max.shape[0], neg_max.dtype, neg_max.device
    if stats is None and head.num_stats:
        stats = torch.zeros(rows, head.num_stats, dtype=torch.float64, device=device)
    if stats is not None:
        stats = all_reduce(stats, dist.ReduceOp.SUM, group)
    owned_stats = stats[owned] if stats is not None else None
    positive, positive_slope = _positive_and_slope(head, local_target, select_rows(prep, owned),
                                                   owned_stats)
    positive = positive.to(work) * head.scale
    local_max = neg_max.clone()
    local_max[owned] = torch.maximum(neg_max[owned], positive)
    row_max = all_reduce(local_max, dist.ReduceOp.MAX, group)
    local_sum = neg_sum * torch.exp(neg_max - row_max)
    local_sum[owned] += torch.exp(positive - row_max[owned])
    target_logit = torch.zeros_like(local_sum)
    target_logit[owned] = positive
    summed = all_reduce(torch.stack([local_sum, target_logit]), dist.ReduceOp.SUM, group)
    sum_exp = summed[0]
    loss = torch.log(sum_exp) + row_max - summed[1]
    # Backward works with exp(logit - row_max) and divides by sum_exp per row, as the reference
    # softmax does (a log-sum-exp of magnitude ~s would cost fp32 an ulp).
    p_target = torch.exp(positive - row_max[owned])
    in_range = (raw_target >= -1.0) & (raw_target <= 1.0)
    target_coef = (p_target - sum_exp[owned]) * positive_slope.to(work) * in_range.to(work)
    return loss, row_max, sum_exp, target_coef, stats


def _row_sweep(tiles, head, blocks, group, e_unit, e_gemm, target_index, prep, local_target,
               raw_target, chunk_rows, need_e, need_w):
    """Steps 2-3 and the whole backward, chunk by chunk of ``chunk_rows`` global-batch rows
    against every scored class of this rank: three GEMMs per chunk (the [rows x classes] tile,
    then (G/|w|) @ W and (G/|w|)^T @ (r e)), the tile never recomputed.

    A chunk's tile holds every class, so its rows' statistics, max and sum-exp are complete
    once ``tiles.forward`` has seen it; the collectives of step 3 run per chunk (every rank
    walks the same chunks), and the chunk's gradient tile G (``tiles.backward``, in place) feeds
    the two gradient GEMMs at once. Gradients are formed per unit upstream gradient: the
    embedding side per row (scaled in backward by each row's upstream gradient), the weight side
    summed over rows (valid when that gradient is the same for every row, as for a mean loss;
    backward checks and otherwise recomputes it by the class sweep).

    Returns (loss, row_max, sum_exp, target_coef, stats, w_norm, grad_unit, grad_rows): per
    row; per owned row; [Bg, num_stats] or None; [scored] |w|; the unit embeddings' gradient
    [Bg, D] per unit upstream gradient (None unless ``need_e``); the scored rows' gradient
    [scored, D] per unit upstream gradient, in the working dtype (None unless ``need_w``; a sum
    over the rows, so up to Bg times the gradient of a mean loss: :func:`_weight_grad_of_rows`
    scales it before it takes the weight's dtype, which an fp16 weight could not hold)."""
    rows, work, gemm, device = e_unit.shape[0], blocks.work, blocks.gemm, e_unit.device
    count = blocks.count
    w_raw = blocks.raw_rows(slice(0, count))
    w_norm = w_raw.norm(dim=1)
    inv_norm = 1.0 / w_norm.clamp_min(NORM_EPS)
    w_gemm = w_raw if gemm == work else w_raw.to(gemm)
    # One tile buffer, overwritten in place by the gradient tile. With low-precision GEMMs the
    # product comes back as a fresh working-dtype tile, so only the gradient tile is kept.
    grad_buffer = torch.empty(min(chunk_rows, rows) * count, dtype=gemm, device=device)
    buffer = grad_buffer if gemm == work else None
    grad_unit = None  # every chunk writes its rows; a rank without classes contributes zero
    if need_e:
        grad_unit = (torch.empty_like if count else torch.zeros_like)(e_unit)
    x = None  # need_w: X = the sum over chunks of (G/|w|)^T @ (r e), written by the first
    owned_rows = blocks.owned_rows
    outs = []
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        r = stop - start
        chunk_prep = {k: v[start:stop] for k, v in prep.items()}
        cols = target_index[start:stop]
        if count:
            tile = None if buffer is None else buffer[: r * count].view(r, count)
            raw = _matmul(e_gemm[start:stop], w_gemm.t(), work, out=tile)
            neg_max, neg_sum, sums = tiles.forward(
                raw, inv_norm, cols, chunk_prep,
                torch.full((r,), -math.inf, dtype=work, device=device),
                torch.zeros(r, dtype=work, device=device))
            stats = stack_sums(sums)
        else:  # no classes on this rank: nothing to score, but the collectives still run
            neg_max = torch.full((r,), -math.inf, dtype=work, device=device)
            neg_sum, stats = torch.zeros(r, dtype=work, device=device), None
        inside = ((owned_rows >= start) & (owned_rows < stop)).nonzero(as_tuple=True)[0]
        owned = owned_rows[inside] - start
        terms = _softmax_terms(head, group, neg_max, neg_sum, stats, chunk_prep, owned,
                               local_target[inside], raw_target[inside])
        outs.append(terms)
        if not count or not (need_e or need_w):
            continue
        _, row_max, sum_exp, target_coef, _ = terms
        coef = torch.zeros(r, dtype=work, device=device)
        coef[owned] = target_coef
        row_scale = head.scale / sum_exp
        out = tiles.backward(raw, inv_norm, cols, coef, chunk_prep, row_max,
                             grad_buffer[: r * count].view(r, count))
        if need_w:
            e_scaled = (e_unit[start:stop] * row_scale[:, None]).to(gemm)
            if x is None:
                x = _matmul(out.t(), e_scaled, work)
            else:
                _add_matmul_(x, out.t(), e_scaled)
        if need_e:
            grad_unit[start:stop] = _matmul(out, w_gemm, work) * row_scale[:, None]
    loss, row_max, sum_exp, target_coef, stats = (
        torch.cat(parts) if parts[0] is not None else None for parts in zip(*outs))
    if need_w and x is None:  # no classes on this rank
        x = torch.zeros(count, e_unit.shape[1], dtype=work, device=device)
    elif need_w:
        tiles.project_weight_grad_(x, w_raw, inv_norm, (w_norm >= NORM_EPS).to(work))
    return loss, row_max, sum_exp, target_coef, stats, w_norm, grad_unit, x


def _weight_grad_of_rows(grad_rows, weight, row_index, factor):
    """The weight's gradient from the scored rows' gradient ``grad_rows`` [scored, D] (working
    dtype; scaled in place by ``factor``, a [1] tensor), in the weight's dtype and shape: the
    rows ``row_index`` (every row when None) take it, the others are zero."""
    grad_rows.mul_(factor)
    if row_index is None:
        return grad_rows.to(weight.dtype)
    grad_weight = torch.zeros_like(weight)
    return grad_weight.index_copy_(0, row_index, grad_rows.to(weight.dtype))


class _ChunkedMarginLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, target_index, row_index, head, group, block_size,
                gemm_dtype, side, tiles, chunk_rows, grad_enabled):
        work = compute_dtype(embeddings, weight)
        gemm = gemm_dtype or work  # resolved by chunked_margin_loss (autocast is off in here)
        blocks = _Blocks(weight, row_index, target_index, block_size, work, gemm)
        rows = embeddings.shape[0]
        device = embeddings.device
        e_unit, e_norm = _normalize_rows(embeddings.to(work))
        e_gemm = e_unit.to(gemm)

        # 1. Target cosines straight from the target rows (the owner contributes, then all-reduce).
        owned_rows, owned_cols = blocks.owned_rows, blocks.owned_cols
        _, w_target, _ = blocks.unit_rows(owned_cols)
        raw_target = (e_gemm[owned_rows].to(work) * w_target.to(work)).sum(dim=1)
        local_target = raw_target.clamp(-1.0, 1.0)
        target_cos = gather_target_cosines(local_target, owned_rows, rows, work, device, group)
        prep = head.prepare(target_cos)

        ctx.precomputed = None
        if chunk_rows:
            # 2-3 and the gradients, chunk by chunk of rows (see _row_sweep).
            # needs_input_grad says True under no_grad too: the caller's grad mode decides.
            need_e = grad_enabled and ctx.needs_input_grad[0]
            need_w = grad_enabled and ctx.needs_input_grad[1]
            (loss, row_max, sum_exp, target_coef, stats, w_norm, grad_unit,
             grad_rows) = _row_sweep(tiles, head, blocks, group, e_unit, e_gemm, target_index,
                                     prep, local_target, raw_target, chunk_rows, need_e, need_w)
            ctx.precomputed = (grad_unit, grad_rows)
        else:
            # 2. One sweep over class blocks: negative statistics and the running max / sum-exp
            #    of the negative logits (kept as max and a sum relative to it, not as a log:
            #    adding logs of magnitude ~s block after block would cost fp32 an ulp of s each
            #    time). 3. The positive logit joins; global max and sum-exp; the loss.
            w_norm = torch.empty(blocks.count, dtype=work, device=device)  # filled by the sweep
            neg_max = torch.full((rows,), -math.inf, dtype=work, device=device)
            neg_sum = torch.zeros(rows, dtype=work, device=device)
            if tiles is None:
                neg_max, neg_sum, stats = _eager_forward_sweep(head, blocks, e_gemm, prep, w_norm,
                                                               neg_max, neg_sum)
            else:
                neg_max, neg_sum, stats = _fused_forward_sweep(tiles, blocks, e_gemm, prep,
                                                               w_norm, neg_max, neg_sum)
            loss, row_max, sum_exp, target_coef, stats = _softmax_terms(
                head, group, neg_max, neg_sum, stats, prep, owned_rows, local_target, raw_target)

        side.update(prep=prep, stats=stats, target_cos=target_cos)
        ctx.blocks, ctx.head, ctx.prep, ctx.tiles = blocks, head, prep, tiles
        ctx.embedding_dtype = embeddings.dtype
        ctx.save_for_backward(e_unit, e_norm, weight, row_index, w_norm, row_max, sum_exp, target_coef)
        ctx.has_row_index = row_index is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        e_unit, e_norm, weight, row_index, w_norm, row_max, sum_exp, target_coef = ctx.saved_tensors
        blocks, head, prep = ctx.blocks, ctx.head, ctx.prep
        blocks.weight, blocks.row_index = weight, (row_index if ctx.has_row_index else None)
        work, gemm = blocks.work, blocks.gemm
        need_e, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_loss = grad_loss.to(work)
        grad_unit = grad_weight = None
        if ctx.precomputed is not None:  # the row sweep's, per unit upstream gradient
            grad_unit, grad_rows = ctx.precomputed
            ctx.precomputed = None
            if grad_unit is not None:
                grad_unit.mul_(grad_loss[:, None])
            uniform = grad_loss[:1]
            # A weighted loss (row factors differ) leaves the weight's gradient to the class sweep.
            if grad_rows is not None and bool((grad_loss == uniform).all()):
                grad_weight = _weight_grad_of_rows(grad_rows, weight, blocks.row_index, uniform)
        redo_e, redo_w = need_e and grad_unit is None, need_w and grad_weight is None
        if redo_e or redo_w:
            # d loss / d cos_ik = row_scale_i * P_ik with P = exp(s N(c_ik) - row_max_i) N'(c_ik)
            # from the head: the per-row factor (upstream gradient, s, 1 / sum-exp) is applied
            # to the [rows x D] operands and results, never to the tile.
            row_scale = grad_loss * head.scale / sum_exp
            e_gemm = e_unit.to(gemm)
            e_scaled = (e_unit * row_scale[:, None]).to(gemm) if redo_w else None
            if redo_e:
                grad_unit = torch.zeros_like(e_unit)
            if redo_w:  # every row is written unless only the rows of row_index are scored
                grad_weight = (torch.zeros_like if ctx.has_row_index else torch.empty_like)(weight)
            sweep = _eager_backward_sweep if ctx.tiles is None else partial(_fused_backward_sweep,
                                                                              ctx.tiles)
            sweep(head, blocks, prep, e_gemm, e_scaled, w_norm, row_max, target_coef,
                  grad_unit if redo_e else None, grad_weight if redo_w else None)
            if redo_e:
                grad_unit.mul_(row_scale[:, None])
        grad_embeddings = None
        if grad_unit is not None and ctx.needs_input_grad[0]:
            grad_embeddings = _normalize_backward(grad_unit, e_unit, e_norm).to(ctx.embedding_dtype)
        # The context stays for a retained graph's next backward (which forms the gradients
        # again); the weight is back in saved_tensors then, so the blocks let go of it.
        blocks.weight = blocks.row_index = None
        return (grad_embeddings, grad_weight, None, None, None, None, None, None, None, None,
                None, None)


def plan_chunk_rows(sweep: str, fused: bool, rows: int, scored: int, device,
                    chunk_rows: Optional[int] = None) -> int:
    """Rows per chunk of the row sweep for ``sweep`` (see :func:`chunked_margin_loss`), or 0 for
    the class sweep: ``fused`` whether every rank has fused tiles, ``rows`` the global batch,
    ``scored`` the most classes any rank scores. An empty batch (``rows`` 0) takes the class
    sweep whatever ``sweep`` says: the row sweep has no chunk to walk."""
    if sweep == "classes" or (sweep == "auto" and not fused) or rows == 0:
        return 0
    if chunk_rows is not None:
        return min(chunk_rows, rows)
    return row_chunk_size(rows, scored, device, minimum=sweep == "auto")


def _chunk_rows(sweep, chunk_rows, fused, embeddings, weight, row_index, group) -> int:
    """:func:`plan_chunk_rows` with every rank's view: the same value on every rank."""
    if sweep == "classes" or (sweep == "rows" and chunk_rows is not None):
        return plan_chunk_rows(sweep, fused, embeddings.shape[0], 0, embeddings.device, chunk_rows)
    scored = int(row_index.numel()) if row_index is not None else int(weight.shape[0])
    if group is not None:  # the most any rank scores, and whether some rank lacks fused tiles
        agree = torch.tensor([scored, int(not fused)], dtype=torch.int64, device=embeddings.device)
        dist.all_reduce(agree, op=dist.ReduceOp.MAX, group=group)
        scored, fused = int(agree[0]), not bool(agree[1])
    return plan_chunk_rows(sweep, fused, embeddings.shape[0], scored, embeddings.device,
                           chunk_rows)


def chunked_margin_loss(
    head,
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    target_index: torch.Tensor,
    group=None,
    block_size: Optional[int] = None,
    row_index: Optional[torch.Tensor] = None,
    gemm_dtype: Optional[torch.dtype] = None,
    tiles: Optional[FusedTiles] = None,
    sweep: str = "auto",
    chunk_rows: Optional[int] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-row margin-softmax loss of the global batch against this rank's class rows, computed
    over blocks of ``block_size`` classes without materialising the logits.

    Same contract and results as :func:`partial_fc.reference.reference_margin_loss`:
    ``embeddings`` [Bg, D] is the global batch, ``weight`` [n, D] this rank's scored class rows,
    ``target_index`` [Bg] the local row of each target or -1. Returns the per-row loss (identical
    on all ranks) and detached per-row diagnostics (the head's, plus ``target_cos``).

    Extra arguments: ``block_size`` classes per tile (default :func:`default_block_size`);
    ``row_index`` scores the rows ``weight[row_index]`` (Partial FC's sampled rows) without
    copying them, ``target_index`` then indexes into ``row_index`` and ``weight``'s gradient is
    zero outside those rows; ``gemm_dtype`` overrides the GEMM input dtype (see
    :func:`resolve_gemm_dtype`; statistics stay in fp32 or wider); ``tiles`` a
    :class:`partial_fc.fused_tiles.FusedTiles` of ``head`` runs each tile's elementwise work as
    one fused pass per direction (None: the head's tile methods, one operation at a time; a
    ``tiles`` whose compile failed also falls back to them).

    ``sweep`` orders the work. ``"classes"``: blocks of classes, each tile recomputed in
    backward (four GEMMs; memory one [Bg x block] tile). ``"rows"``: chunks of ``chunk_rows``
    rows against every scored class, gradients formed in the forward (three GEMMs; memory one
    [chunk x scored] tile plus the weight-gradient accumulator; the tile functions of ``tiles``,
    run eagerly when ``tiles`` is None). ``"auto"`` (default): rows when ``tiles`` is given and
    :func:`row_chunk_size` allows it for the most classes any rank scores, else classes; every
    rank of ``group`` takes the same choice (one small all-reduce). ``chunk_rows`` (rows sweep
    only) overrides the chunk size.

    The rows sweep forms the weight gradient per unit upstream gradient: when ``loss.backward``
    brings a different upstream gradient per row (a weighted loss instead of a mean), backward
    forms it again with the class sweep, same results, four GEMMs.

    Raises ValueError for shapes that do not match, a ``row_index`` that is not 1-D int64,
    ``tiles`` of another head, a ``block_size``/``chunk_rows`` that is not a positive int or a
    ``sweep`` not in ``SWEEPS``.
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings [rows, D] and weight [classes, D] expected, got "
            f"{tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    if target_index.shape != embeddings.shape[:1]:
        raise ValueError(
            f"target_index shape {tuple(target_index.shape)} does not match "
            f"{embeddings.shape[0]} rows"
        )
    if row_index is not None and (row_index.dim() != 1 or row_index.dtype != torch.int64):
        raise ValueError(f"row_index must be a 1-D int64 tensor, got {row_index.dtype} "
                         f"of shape {tuple(row_index.shape)}")
    if tiles is not None and tiles.head is not head:
        raise ValueError("tiles were built for another head than the one given")
    if tiles is not None and tiles.broken:
        tiles = None
    if block_size is None:
        block_size = default_block_size(embeddings.shape[0], embeddings.device)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {SWEEPS}, got {sweep!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    chunk_rows = _chunk_rows(sweep, chunk_rows, tiles is not None, embeddings, weight, row_index,
                             group)
    if chunk_rows and tiles is None:
        tiles = FusedTiles(head, compile=False)
    side: Dict[str, object] = {}
    gemm = resolve_gemm_dtype(embeddings, compute_dtype(embeddings, weight), gemm_dtype)
    # The function picks every dtype itself: autocast would recast its fp32 statistics.
    with torch.autocast(embeddings.device.type, enabled=False):
        loss = _ChunkedMarginLoss.apply(
            embeddings, weight, target_index, row_index, head, group, block_size, gemm, side,
            tiles, chunk_rows, torch.is_grad_enabled(),
        )
    diagnostics = {k: v.detach() for k, v in head.diagnostics(side["prep"], side["stats"]).items()}
    diagnostics["target_cos"] = side["target_cos"]
    return loss, diagnostics
