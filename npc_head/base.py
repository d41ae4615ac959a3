"""The contract between a margin head and the sharded classifier that drives it.

The classifier (``partial_fc.PartialFC``) owns the cosines and the softmax; a head only says how
to turn cosines into logits, through the calls of :class:`MarginHead`. The protocol, with its
order, shapes and dtypes, is written once: docs/ALGORITHM.md, section 4.
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


class MarginHead(nn.Module):
    """Base class of margin heads: the protocol of docs/ALGORITHM.md, section 4.

    A head defines :meth:`positive_logit` and, where it departs from the plain softmax over
    scaled cosines, :meth:`prepare`, :meth:`negative_logits` (and its slope), ``num_stats`` with
    :meth:`negative_sums`, and :meth:`diagnostics`. Logits are multiplied by ``scale`` (s).
    """

    num_stats: int = 0  # per-row sums over the negatives that positive_logit needs

    def __init__(self, s: float):
        super().__init__()
        if not s > 0:
            raise ValueError(f"scale s must be > 0, got {s}")
        self.scale = float(s)

    def prepare(self, target_cos: torch.Tensor, norms: torch.Tensor) -> Prep:
        """Per-row values the other calls need, from every row's target cosine c_y and its
        embedding norm |e_i| (both [Bg], detached, identical on every rank). Running state is
        updated here, in training mode."""
        return {}

    def negative_sums(self, cos: torch.Tensor, prep: Prep) -> tuple:
        """``num_stats`` per-row sums over the columns of ``cos`` [rows, cols], each [rows] in
        ``cos.dtype`` (empty without statistics). Raises NotImplementedError for a head that
        declares statistics and does not define them."""
        if self.num_stats:
            raise NotImplementedError(f"{type(self).__name__} has num_stats={self.num_stats}: it "
                                      f"must implement negative_sums")
        return ()

    def negative_logits(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        """Unscaled negative logits, elementwise per row (the target column's is discarded)."""
        return cos

    def negative_logit_slope(self, cos: torch.Tensor, prep: Prep) -> Optional[torch.Tensor]:
        """Elementwise d negative_logits / d cos; None means identically 1. The default derives
        it by autograd (None for the identity); heads may give a closed form."""
        if type(self).negative_logits is MarginHead.negative_logits:
            return None
        with torch.enable_grad():
            c = cos.detach().requires_grad_(True)
            logits = self.negative_logits(c, prep)
            if not logits.requires_grad:
                return torch.zeros_like(cos)
            (slope,) = torch.autograd.grad(logits, c, torch.ones_like(logits), allow_unused=True)
        return torch.zeros_like(cos) if slope is None else slope

    def positive_logit(self, target_cos: torch.Tensor, prep: Prep,
                       stats: Optional[torch.Tensor]) -> torch.Tensor:
        """Unscaled target logits [Bg] from the differentiable target cosines and the
        all-reduced statistics [Bg, num_stats] float64 (None without statistics)."""
        raise NotImplementedError

    def diagnostics(self, prep: Prep, stats: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Detached per-row values worth logging (e.g. NPCFace's margin and hard counts)."""
        return {}
