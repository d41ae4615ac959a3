"""One pass per direction over each tile of the chunked classifier.

The chunked path (:mod:`partial_fc.chunked`) leaves the GEMMs to the vendor library and hands
each raw GEMM tile ``raw = e_unit @ w^T`` (the weight rows *not* normalised; [global batch x
block] in the class sweep, [chunk of rows x every scored class] in the row sweep) to two
elementwise-and-row-reduction functions written to be compiled whole by ``torch.compile``
(inductor: one C++ loop nest on CPU, one Triton kernel on CUDA, from the same code):

- :func:`forward_tile`: ``cos = clamp(raw / |w_k|, -1, 1)``, the head's scaled negative logits,
  the target column masked out by index, the head's per-row negative statistics, and the
  running (max, sum-exp) of the row merged with this tile's (flash-attention's online softmax);
- :func:`backward_tile`: the same cosines and logits recomputed, ``exp(logit - row_max)`` times
  the head's slope, zero where the clamp was active, the target column's coefficient put in by
  index, and the result scaled by ``1 / |w_k|`` so it feeds both gradient GEMMs against the raw
  weight rows directly (the weight normalisation folded into the tile; see
  :mod:`partial_fc.chunked` for the chain rule of the norm).

Both run the head's own ``negative_logits`` / ``negative_logit_slope`` / ``negative_sums``
(the protocol of :mod:`npc_head.base`), so every head gets the fused form. The row sweep also
compiles :func:`project_weight_grad_`, the weight gradient's chain rule through w / |w| in one
pass over the [classes x D] result.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from functools import partial
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Inductor stores a pointwise result to memory once more than `realize_reads_threshold` (4)
# loads read it; the scaled logits of a tile are read by the row max, the sum-exp and the head's
# statistics, and recomputing them in registers beats the round trip of a [rows x classes]
# buffer (NPCFace's forward pass over a 256 x 100K fp32 tile, 2 threads: 46 -> 22 ms; its
# backward 19 -> 15 ms). Keys this torch's inductor does not know are left out.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 100}


def inductor_options() -> dict:
    """``INDUCTOR_OPTIONS`` restricted to the keys of the installed inductor's config."""
    from torch._inductor import config

    return {k: v for k, v in INDUCTOR_OPTIONS.items() if hasattr(config, k)}


def forward_tile(head, raw, inv_norm, target_col, prep, run_max, run_sum):
    """Per-row statistics of one tile, merged into the running max and sum-exp.

    Args: ``raw`` [R, K] (fp32/fp64) the GEMM tile e_unit @ w^T; ``inv_norm`` [K] 1/max(|w_k|,
    1e-12); ``target_col`` [R] int64, the row's target column in this tile or -1; ``prep`` the
    head's per-row dict; ``run_max``, ``run_sum`` [R] the running max of the scaled negative
    logits and the sum of exp(logit - run_max) (-inf and 0 before the first tile).

    Returns ``(new_max, new_sum, sums)``: the merged [R] running values (the sum relative to
    ``new_max``, or to 0 while a row has seen no finite logit) and the head's ``num_stats``
    per-row sums over this tile's negatives (a tuple of [R] tensors in the tile's dtype, empty
    for heads without statistics; :func:`npc_head.base.stack_sums` makes them the classifier's float64
    [R, num_stats]). They stay unstacked here: a stack of reductions would split the compiled
    pass into several loops over the tile.
    """
    cos = (raw * inv_norm).clamp(-1.0, 1.0)
    cols = torch.arange(raw.shape[1], device=raw.device)
    is_target = cols[None, :] == target_col[:, None]
    logits = (head.negative_logits(cos, prep) * head.scale).masked_fill(is_target, -math.inf)
    new_max = torch.maximum(run_max, logits.amax(dim=1))
    shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
    new_sum = run_sum * torch.exp(run_max - shift) + torch.exp(logits - shift[:, None]).sum(dim=1)
    sums = ()
    if head.num_stats:
        # The head's sums over every column, less the target column's share (as the eager path).
        has_target = (target_col >= 0).to(cos.dtype)
        target_val = cos.gather(1, target_col.clamp(min=0)[:, None])
        own = head.negative_sums(target_val, prep)
        sums = tuple(a - b * has_target for a, b in zip(head.negative_sums(cos, prep), own))
    return new_max, new_sum, sums


def backward_tile(head, raw, inv_norm, target_col, target_coef, prep, row_max, out):
    """d loss / d raw of one tile up to a per-row factor, written into ``out`` [R, K].

    ``out[i, k] = P_ik / max(|w_k|, eps)`` with P_ik = exp(scale * N(c_ik) - row_max_i) N'(c_ik)
    for negatives inside the clamp, 0 where the clamp of c_ik was active, and ``target_coef[i]``
    at the row's target column (``target_col`` as in :func:`forward_tile`). ``out`` may be
    ``raw`` itself (same dtype) or a buffer in the GEMM dtype (bf16 on CUDA). Returns ``out``.
    """
    c = raw * inv_norm
    cos = c.clamp(-1.0, 1.0)
    cols = torch.arange(raw.shape[1], device=raw.device)
    is_target = cols[None, :] == target_col[:, None]
    probs = torch.exp(head.negative_logits(cos, prep) * head.scale - row_max[:, None])
    slope = head.negative_logit_slope(cos, prep)
    if slope is not None:
        probs = probs * slope
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    probs = torch.where((c >= -1.0) & (c <= 1.0), probs, zero)
    probs = torch.where(is_target, target_coef[:, None].to(probs.dtype), probs)
    out.copy_(probs * inv_norm)
    return out


def project_weight_grad_(x, weight, inv_norm, keep):
    """The raw weight rows' gradient through w / max(|w|, eps), in place: ``x`` [K, D] holds
    X_k = g_k / |w_k| (g the gradient w.r.t. the unit rows) and becomes X_k - w_k (w_k . X_k) /
    |w_k|^2, the radial part dropped where ``keep`` [K] is 0 (|w_k| < eps: F.normalize's floor
    divides without projecting). ``weight`` [K, D] the raw rows, ``inv_norm`` [K] 1/max(|w|, eps).
    One pass over the rows when compiled (eager: the product is a [K, D] temporary)."""
    radial = (weight * x).sum(dim=1) * inv_norm * inv_norm * keep
    x.sub_(weight * radial[:, None])


def compiler_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why ``torch.compile`` cannot build the tile kernels on ``device``, or None if it can:
    inductor needs a C++ compiler on CPU and Triton on CUDA."""
    if torch.device(device).type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover - very old torch
            return "torch.utils._triton is missing"
        return None if has_triton() else "Triton is not installed"
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("clang++") is None:
        return f"no C++ compiler ({cxx} or clang++) on PATH for inductor"
    return None


class FusedTiles:
    """The two tile passes of one head, and the weight-gradient projection of the row sweep
    (:func:`project_weight_grad_`), compiled once per head (shapes dynamic).

    ``compile=False`` runs the same functions eagerly (the numerics of the compiled form
    without the compile, for tests and debugging). A compile that fails at its first call
    logs one warning and turns ``broken`` on; the caller then falls back to the eager tiles.
    """

    def __init__(self, head, compile: bool = True):
        self.head = head
        self.compile = bool(compile)
        self.broken = False
        fwd, bwd, proj = partial(forward_tile, head), partial(backward_tile, head), \
            project_weight_grad_
        if self.compile:
            # Sizes symbolic: a new batch or block width reuses the graph (no per-step compile).
            options = inductor_options()
            fwd = torch.compile(fwd, dynamic=True, options=options)
            bwd = torch.compile(bwd, dynamic=True, options=options)
            proj = torch.compile(proj, dynamic=True, options=options)
        self._forward, self._backward, self._project = fwd, bwd, proj

    def _run(self, compiled, eager, *args):
        if self.broken:
            return eager(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: keep training, say so once
            if not self.compile:
                raise
            self.broken = True
            log.warning("fused tile kernels failed to compile (%s: %s); the chunked head falls "
                        "back to its unfused tiles", type(exc).__name__, str(exc).splitlines()[0])
            return eager(*args)

    def forward(self, *args):
        return self._run(self._forward, partial(forward_tile, self.head), *args)

    def backward(self, *args):
        return self._run(self._backward, partial(backward_tile, self.head), *args)

    def project_weight_grad_(self, *args):
        return self._run(self._project, project_weight_grad_, *args)
