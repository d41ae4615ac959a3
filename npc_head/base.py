"""The contract between a margin head and the sharded classifier that drives it.

The classifier (``partial_fc.PartialFC``) owns the cosines; a head only says how to turn them
into logits. Per step, for the global batch:

1. ``prepare(target_cos)`` sees every row's target cosine c_y (already all-reduced, detached) and
   returns per-row quantities the other calls need (thresholds, ...). A head with running state
   (CurricularFace's EMA) updates it here, identically on every rank.
2. ``negative_stats(cos, prep)`` returns per-row sums over the given columns, shape
   ``[rows, num_stats]`` in float64; the classifier removes the target column's share, sums the
   result over column blocks and ranks, and hands it to step 4. Heads with ``num_stats == 0``
   return ``None``. A head with statistics implements ``negative_sums(cos, prep)``: the
   ``num_stats`` sums as a tuple of [rows] tensors in the cosines' dtype (fp32 or wider), which
   ``negative_stats`` stacks and widens (the fused tile pass needs them unstacked: a stack of
   reductions splits inductor's one loop over the tile into several). A head that overrides
   ``negative_stats`` instead (the protocol before ``negative_sums``) still works everywhere:
   the default ``negative_sums`` returns its columns.
3. ``negative_logits(cos, prep)`` maps cosines to (unscaled) negative logits, elementwise per
   row; the target column's value is discarded.
   ``negative_logit_slope(cos, prep)`` is its elementwise derivative d logit / d cos, which the
   chunked classifier needs to form gradients without autograd over the tiles; ``None`` means 1.
   The default derives it with autograd (or returns ``None`` for the identity mapping); heads
   may override it with a closed form. Two tile-level combinations, which the chunked
   classifier calls and heads may override to share work (both may overwrite ``cos``):
   ``negative_stats_and_logits(cos, prep)`` -> (stats, scale * logits) and
   ``negative_softmax_slope(cos, prep, shift)`` -> exp(scale * logit - shift) * slope.
4. ``positive_logit(target_cos, prep, stats)`` gives the (unscaled) target logit from the
   differentiable target cosine of the rows this rank owns, with ``prep`` and ``stats`` restricted
   to those rows.

Logits are multiplied by ``scale`` before the softmax. Hyper-parameters of the statistics and
thresholds never receive gradients.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn

Prep = Dict[str, torch.Tensor]


def safe_sine(cos: torch.Tensor) -> torch.Tensor:
    """sqrt(1 - cos^2) with a finite gradient at cos = +-1.

    ``1 - cos^2`` is floored at the dtype's machine epsilon, which only changes values with
    |cos| within about eps/2 of 1, and leaves the gradient there at zero instead of infinite.
    """
    eps = torch.finfo(cos.dtype).eps
    return torch.sqrt(torch.clamp(1.0 - cos * cos, min=eps))


def cos_add(cos: torch.Tensor, angle) -> torch.Tensor:
    """cos(theta + angle) from cos(theta) for theta in [0, pi]; ``angle`` a float or a tensor."""
    if isinstance(angle, torch.Tensor):
        return cos * torch.cos(angle) - safe_sine(cos) * torch.sin(angle)
    return cos * math.cos(angle) - safe_sine(cos) * math.sin(angle)


def select_rows(prep: Prep, rows: torch.Tensor) -> Prep:
    """The per-row entries of ``prep`` for the given row indices."""
    return {k: v[rows] for k, v in prep.items()}


def stack_sums(sums) -> Optional[torch.Tensor]:
    """Per-row sums (a tuple of [rows] tensors, as ``negative_sums`` returns) as the protocol's
    [rows, num_stats] float64 statistics; None for an empty tuple."""
    return torch.stack([x.to(torch.float64) for x in sums], dim=1) if sums else None


class MarginHead(nn.Module):
    """Base class of margin heads; see the module docstring for the protocol."""

    num_stats: int = 0

    def __init__(self, s: float):
        super().__init__()
        if not s > 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        self.scale = float(s)

    def prepare(self, target_cos: torch.Tensor) -> Prep:
        return {}

    def negative_sums(self, cos: torch.Tensor, prep: Prep) -> tuple:
        """The ``num_stats`` per-row sums over the columns of ``cos`` [rows, cols], each [rows]
        in ``cos.dtype`` (empty for heads without statistics). A head that overrides only
        ``negative_stats`` (the protocol before this method) gets its columns, in float64.

        Raises NotImplementedError for a head with statistics that overrides neither."""
        if not self.num_stats:
            return ()
        if type(self).negative_stats is MarginHead.negative_stats:
            raise NotImplementedError(f"{type(self).__name__} has num_stats={self.num_stats}: it "
                                      f"must implement negative_sums")
        return tuple(self.negative_stats(cos, prep).unbind(dim=1))

    def negative_stats(self, cos: torch.Tensor, prep: Prep) -> Optional[torch.Tensor]:
        """``negative_sums`` stacked as [rows, num_stats] float64, or None without statistics."""
        if not self.num_stats:
            return None
        with torch.no_grad():
            return stack_sums(self.negative_sums(cos, prep))

    def negative_logits(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        return cos

    def negative_logit_slope(self, cos: torch.Tensor, prep: Prep) -> Optional[torch.Tensor]:
        """Elementwise d negative_logits / d cos (``None``: identically 1)."""
        if self._identity_negatives():
            return None
        with torch.enable_grad():
            c = cos.detach().requires_grad_(True)
            logits = self.negative_logits(c, prep)
            if not logits.requires_grad:
                return torch.zeros_like(cos)
            (slope,) = torch.autograd.grad(logits, c, torch.ones_like(logits), allow_unused=True)
        return torch.zeros_like(cos) if slope is None else slope

    def negative_stats_and_logits(self, cos: torch.Tensor, prep: Prep):
        """``(negative_stats(cos, prep), scale * negative_logits(cos, prep))`` of one tile of
        cosines (the chunked classifier's forward). May overwrite ``cos``."""
        stats = self.negative_stats(cos, prep)
        logits = cos if self._identity_negatives() else self.negative_logits(cos, prep)
        return stats, logits.mul_(self.scale)

    def negative_softmax_slope(self, cos: torch.Tensor, prep: Prep, shift: torch.Tensor):
        """``exp(scale * negative_logits(cos) - shift[:, None]) * negative_logit_slope(cos)`` of
        one tile (the chunked classifier's backward; ``shift`` is each row's logit maximum).
        May overwrite ``cos``."""
        slope = self.negative_logit_slope(cos, prep)
        logits = cos if self._identity_negatives() else self.negative_logits(cos, prep)
        out = logits.mul_(self.scale).sub_(shift[:, None]).exp_()
        return out if slope is None else out.mul_(slope)

    def _identity_negatives(self) -> bool:
        return type(self).negative_logits is MarginHead.negative_logits

    def positive_logit(
        self, target_cos: torch.Tensor, prep: Prep, stats: Optional[torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def diagnostics(self, prep: Prep, stats: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Detached per-row values worth logging (e.g. NPCFace's margin and hard counts)."""
        return {}
