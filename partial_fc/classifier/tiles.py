"""The elementwise work of the chunked classifier, written once, run compiled or eagerly.

The chunked path (:mod:`partial_fc.classifier.chunked`) leaves the GEMMs to the vendor library
and hands each raw GEMM tile ``raw = e_unit @ w^T`` (weight rows *not* normalised; [global
batch x block] in the class sweep, [chunk of rows x every scored class] in the row sweep) to
two elementwise-and-row-reduction functions:

- :func:`forward_tile`: ``cos = clamp(raw / |w_k|, -1, 1)``, the head's scaled negative logits
  with the target column masked out by index, the head's per-row negative sums, and the
  running (max, sum-exp) of the row merged with this tile's (the online softmax);
- :func:`backward_tile`: the same cosines and logits recomputed, the softmax probability
  ``exp(logit - row_max) / sum_exp`` times the head's slope, zero where the clamp was active,
  the target column's coefficient put in by index, all scaled by ``1 / |w_k|`` so the tile feeds
  both gradient GEMMs against the raw weight rows (the weight normalisation folded in). Every
  value is a probability times a slope, so a tile in fp16 cannot overflow.

and :func:`project_weight_grad_`, the weight gradient's chain rule through w / |w|. Both sweeps
and every head run these functions; :class:`Tiles` runs them through ``torch.compile``
(inductor: one C++ loop nest on CPU, one Triton kernel on CUDA, from the same code) or as they
are. The math, step by step: docs/ALGORITHM.md, section 7.
"""
from __future__ import annotations

import math
import os
import shutil
import warnings
from functools import partial
from typing import Optional

import torch

# Inductor stores a pointwise result to memory once more than `realize_reads_threshold` (4)
# loads read it; the scaled logits of a tile are read by the row max, the sum-exp and the head's
# sums, and recomputing them in registers beats the round trip of a [rows x classes] buffer
# (NPCFace's forward pass over a 256 x 100K fp32 tile, 2 threads: 46 -> 22 ms; its backward
# 19 -> 15 ms). Keys this torch's inductor does not know are left out.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 100}


def stack_sums(sums) -> Optional[torch.Tensor]:
    """Per-row sums (a tuple of [rows] tensors, as ``negative_sums`` returns) as the
    classifier's [rows, num_stats] float64 statistics; None for an empty tuple."""
    return torch.stack([x.to(torch.float64) for x in sums], dim=1) if sums else None


def target_mask(target_col: torch.Tensor, cols: int) -> torch.Tensor:
    """[R, cols] bool: True at each row's target column ``target_col`` [R] (-1: none here)."""
    return torch.arange(cols, device=target_col.device)[None, :] == target_col[:, None]


def negative_sums(head, cos: torch.Tensor, prep, target_col: torch.Tensor) -> tuple:
    """The head's per-row sums over the columns of ``cos`` [R, K] less the target column's
    share (``target_col`` [R], -1 where the target is elsewhere); empty without statistics."""
    if not head.num_stats:
        return ()
    if cos.shape[1] == 0:
        return tuple(cos.new_zeros(cos.shape[0]) for _ in range(head.num_stats))
    has_target = (target_col >= 0).to(cos.dtype)
    own = head.negative_sums(cos.gather(1, target_col.clamp(min=0)[:, None]), prep)
    return tuple(a - b * has_target for a, b in zip(head.negative_sums(cos, prep), own))


def forward_tile(head, raw, inv_norm, target_col, prep, run_max, run_sum):
    """Per-row statistics of one tile, merged into the running max and sum-exp.

    Args: ``raw`` [R, K] (fp32/fp64) the GEMM tile e_unit @ w^T; ``inv_norm`` [K]
    1/max(|w_k|, 1e-12); ``target_col`` [R] int64, the row's target column in this tile or -1;
    ``prep`` the head's per-row dict; ``run_max``, ``run_sum`` [R] the running max of the
    scaled negative logits and the sum of exp(logit - run_max) (-inf and 0 before the first).

    Returns ``(new_max, new_sum, sums)``: the merged [R] running values (the sum relative to
    ``new_max``, or to 0 while a row has seen no finite logit) and the head's per-row sums over
    this tile's negatives (:func:`negative_sums`; unstacked: a stack of reductions would split
    the compiled pass into several loops over the tile).
    """
    cos = (raw * inv_norm).clamp(-1.0, 1.0)
    is_target = target_mask(target_col, raw.shape[1])
    logits = (head.negative_logits(cos, prep) * head.scale).masked_fill(is_target, -math.inf)
    new_max = torch.maximum(run_max, logits.amax(dim=1))
    shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
    new_sum = run_sum * torch.exp(run_max - shift) + torch.exp(logits - shift[:, None]).sum(dim=1)
    return new_max, new_sum, negative_sums(head, cos, prep, target_col)


def backward_tile(head, raw, inv_norm, target_col, target_coef, prep, row_max, inv_sum, out):
    """d loss / d raw of one tile up to a per-row factor, written into ``out`` [R, K].

    ``out[i, k] = p_ik N'(c_ik) / max(|w_k|, eps)``, p_ik = exp(s N(c_ik) - row_max_i) *
    inv_sum_i the softmax probability, for negatives inside the clamp; 0 where the clamp of c_ik
    was active; ``target_coef[i] / |w_k|`` at the row's target column (``target_col`` as in
    :func:`forward_tile`). ``out`` may be ``raw`` itself (same dtype) or a buffer in the GEMM
    dtype (bf16/fp16). Returns ``out``.
    """
    c = raw * inv_norm
    cos = c.clamp(-1.0, 1.0)
    probs = torch.exp(head.negative_logits(cos, prep) * head.scale - row_max[:, None])
    probs = probs * inv_sum[:, None]
    slope = head.negative_logit_slope(cos, prep)
    if slope is not None:
        probs = probs * slope
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    probs = torch.where((c >= -1.0) & (c <= 1.0), probs, zero)
    probs = torch.where(target_mask(target_col, raw.shape[1]), target_coef[:, None].to(probs.dtype),
                        probs)
    out.copy_(probs * inv_norm)
    return out


def project_weight_grad_(x, weight, inv_norm, keep, scale):
    """The raw weight rows' gradient through w / max(|w|, eps), in place: ``x`` [K, D] holds
    X_k = g_k / |w_k| (g the gradient w.r.t. the unit rows) and becomes scale * (X_k - w_k (w_k .
    X_k) / |w_k|^2), the radial part dropped where ``keep`` [K] is 0 (|w_k| < eps: F.normalize's
    floor divides without projecting). ``weight`` [K, D] the raw rows, ``inv_norm`` [K]
    1/max(|w|, eps), ``scale`` a [1] tensor (the upstream gradient, folded into this pass).
    One pass over the rows when compiled (eager: the product is a [K, D] temporary)."""
    radial = (weight * x).sum(dim=1) * inv_norm * inv_norm * keep
    x.sub_(weight * radial[:, None]).mul_(scale)


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


def is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the compiler's (dynamo / inductor / a C++ or Triton build), not an
    out-of-memory or device error raised through it, which must reach the caller."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc as inductor_exc

    device_errors = tuple(e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError",
                                                                      None)) if e is not None)
    cause: Optional[BaseException] = exc
    while cause is not None:
        if isinstance(cause, device_errors) or "CUDA error" in str(cause).split("\n")[0]:
            return False
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    names = ("InductorError", "CppCompileError", "CUDACompileError")
    compiler = tuple(getattr(inductor_exc, n) for n in names if hasattr(inductor_exc, n))
    return isinstance(exc, (TorchDynamoException, *compiler))


class Tiles:
    """The tile functions of one head: compiled once (``compile=True``; shapes dynamic, so a new
    batch or block width reuses the graph) or eager, the same functions either way.

    A compile that fails at a call warns once, turns ``broken`` on and runs that call and every
    later one eagerly; an out-of-memory or device error is raised, never taken for one.
    """

    def __init__(self, head, compile: bool = True):
        self.head = head
        self.compile = bool(compile)
        self.broken = False
        self._eager = dict(forward=partial(forward_tile, head),
                           backward=partial(backward_tile, head), project=project_weight_grad_)
        self._compiled, self._eager_twin = {}, None
        if self.compile:
            options = {k: v for k, v in INDUCTOR_OPTIONS.items() if _inductor_knows(k)}
            self._compiled = {k: torch.compile(f, dynamic=True, options=options)
                              for k, f in self._eager.items()}

    @property
    def active(self) -> bool:
        """Whether the next call runs compiled."""
        return self.compile and not self.broken

    def as_planned(self, compiled: bool) -> "Tiles":
        """These tiles, or their eager twin when the step's plan says eager (some rank cannot
        compile) and these would run compiled."""
        if compiled or not self.active:
            return self
        if self._eager_twin is None:
            self._eager_twin = Tiles(self.head, compile=False)
        return self._eager_twin

    def _run(self, name, *args):
        if self.active:
            try:
                return self._compiled[name](*args)
            except Exception as exc:  # noqa: BLE001 - sorted by is_compile_failure
                if not is_compile_failure(exc):
                    raise
                self.broken = True
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                warnings.warn(f"the classifier's tile kernels failed to compile "
                              f"({type(exc).__name__}: {first_line}); they run eagerly from now on",
                              RuntimeWarning, stacklevel=3)
        return self._eager[name](*args)

    def forward(self, *args):
        return self._run("forward", *args)

    def backward(self, *args):
        return self._run("backward", *args)

    def project_weight_grad_(self, *args):
        return self._run("project", *args)


def _inductor_knows(key: str) -> bool:
    from torch._inductor import config

    return hasattr(config, key)
