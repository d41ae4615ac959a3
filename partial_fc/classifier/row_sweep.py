"""The row sweep of the chunked path: chunks of rows against every scored class of the rank,
three GEMMs per chunk, the tile never recomputed (docs/ALGORITHM.md, section 7a)."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

from .numerics import NORM_EPS, add_matmul_, matmul
from .sweeps import ScoredRows, Terms, softmax_terms
from .tiles import stack_sums


class RowSweep(NamedTuple):
    """What the row sweep leaves: the rows' :class:`Terms`, ``w_norm`` [scored] the rows'
    norms, ``grad_unit`` [Bg, D] the unit embeddings' gradient per unit upstream gradient
    (None unless asked) and ``grad_rows`` [scored, D] the unit rows' gradient divided by |w|
    for an upstream gradient of 1 on every row (a sum over the rows, in the working dtype;
    :func:`project_rows_` makes it the weight's; None unless asked)."""

    terms: Terms
    w_norm: torch.Tensor
    grad_unit: Optional[torch.Tensor]
    grad_rows: Optional[torch.Tensor]


def _chunk(values, start: int, stop: int):
    return {k: v[start:stop] for k, v in values.items()}


def row_sweep(tiles, head, rows: ScoredRows, group, e_unit, e_gemm, target_index, prep,
              raw_target, target_cos, chunk_rows: int, need_e: bool, need_w: bool) -> RowSweep:
    """The forward, and the gradients asked for (``need_e``, ``need_w``), chunk by chunk of
    ``chunk_rows`` global-batch rows.

    A chunk's tile holds every class, so its rows' statistics, max and sum-exp are complete once
    ``tiles.forward`` has seen it; the collectives of :func:`softmax_terms` run per chunk (every
    rank walks the same chunks), and the chunk's gradient tile (``tiles.backward``, in place)
    feeds the two gradient GEMMs at once. The embedding side is formed per row (backward scales
    each row by its upstream gradient), the weight side summed over the rows (backward scales it
    by the one upstream gradient of a mean loss).
    """
    n, work, gemm, device = e_unit.shape[0], rows.work, rows.gemm, e_unit.device
    count = rows.count
    w_raw = rows.raw(slice(0, count))
    w_norm = w_raw.norm(dim=1)
    inv_norm = 1.0 / w_norm.clamp_min(NORM_EPS)
    w_gemm = w_raw if gemm == work else w_raw.to(gemm)
    # One tile buffer, overwritten in place by the gradient tile. With low-precision GEMMs the
    # product comes back as a fresh working-dtype tile, so only the gradient tile is kept.
    grad_buffer = torch.empty(min(chunk_rows, n) * count, dtype=gemm, device=device)
    buffer = grad_buffer if gemm == work else None
    grad_unit = None  # every chunk writes its rows; a rank without classes contributes zero
    if need_e:
        grad_unit = (torch.empty_like if count else torch.zeros_like)(e_unit)
    x = None  # need_w: X = the sum over chunks of (G/|w|)^T @ (s e), written by the first
    parts: List[Terms] = []
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        r = stop - start
        cols, chunk_prep = target_index[start:stop], _chunk(prep, start, stop)
        neg_max = torch.full((r,), -math.inf, dtype=work, device=device)
        neg_sum, sums, raw = torch.zeros(r, dtype=work, device=device), (), None
        if count:  # a rank without classes scores nothing, but its collectives still run
            tile = None if buffer is None else buffer[: r * count].view(r, count)
            raw = matmul(e_gemm[start:stop], w_gemm.t(), work, out=tile)
            neg_max, neg_sum, sums = tiles.forward(raw, inv_norm, cols, chunk_prep, neg_max,
                                                   neg_sum)
        terms = softmax_terms(head, group, neg_max, neg_sum, stack_sums(sums), chunk_prep, cols,
                              raw_target[start:stop], target_cos[start:stop])
        parts.append(terms)
        if raw is None or not (need_e or need_w):
            continue
        grad = tiles.backward(raw, inv_norm, cols, terms.target_coef, chunk_prep, terms.row_max,
                              terms.inv_sum, grad_buffer[: r * count].view(r, count))
        if need_w:
            e_scaled = (e_unit[start:stop] * head.scale).to(gemm)
            if x is None:
                x = matmul(grad.t(), e_scaled, work)
            else:
                add_matmul_(x, grad.t(), e_scaled)
        if need_e:
            grad_unit[start:stop] = matmul(grad, w_gemm, work) * head.scale
    terms = Terms(*(torch.cat(p) if p[0] is not None else None for p in zip(*parts)))
    if need_w and x is None:  # no classes on this rank
        x = torch.zeros(count, e_unit.shape[1], dtype=work, device=device)
    return RowSweep(terms, w_norm, grad_unit, x)


def project_rows_(tiles, rows: ScoredRows, grad_rows, w_norm, scale) -> torch.Tensor:
    """The scored rows' gradient from :func:`row_sweep`'s ``grad_rows`` (before the chain rule
    through w / |w|), projected and scaled by ``scale`` (the upstream gradient) in one pass."""
    if rows.count:
        tiles.project_weight_grad_(grad_rows, rows.raw(slice(0, rows.count)),
                                   1.0 / w_norm.clamp_min(NORM_EPS),
                                   (w_norm >= NORM_EPS).to(rows.work), scale)
    return grad_rows
