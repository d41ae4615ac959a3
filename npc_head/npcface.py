"""NPCFace: negative-positive collaborative margins (Zeng et al., 2020)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import MarginHead, Prep, cos_add


class NPCFace(MarginHead):
    """NPCFace head.

    For a row with target cosine c_y and negative cosines c_k (k != y):

    - tau = cos(theta_y + hard_margin); negatives with c_k > tau are hard (I_k = 1);
    - m_i = m0 + m1 * sum(I_k c_k) / max(1, sum I_k), without gradient;
    - positive logit cos(theta_y + m_i) where c_y > 0, else c_y;
    - negative logit t * c_k + alpha where hard, else c_k;

    all scaled by ``s``. ``hard_margin`` defaults to ``m0`` (the authors' FaceX-Zoo head
    thresholds with its separate ``margin``, 0.5 by default).

    Inputs of the protocol calls are float cosines [rows] / [rows, cols] (fp32 or wider); the
    statistics are float64 [rows, 2]. Source: Zeng et al., arXiv:2007.10172, and the authors'
    code; every formula and special case: docs/ALGORITHM.md, section 2.
    """

    num_stats = 2  # [sum_k I_k c_k, sum_k I_k]

    def __init__(self, s=64.0, m0=0.4, m1=0.2, t=1.1, alpha=0.2, hard_margin=None):
        super().__init__(s)
        self.m0, self.m1, self.t, self.alpha = float(m0), float(m1), float(t), float(alpha)
        self.hard_margin = float(m0 if hard_margin is None else hard_margin)
        if not 0 <= self.m0 < math.pi:
            raise ValueError(f"m0 must be in [0, pi), got {m0}")
        if self.m1 < 0:
            raise ValueError(f"m1 must be >= 0, got {m1}")
        if self.t < 1:
            raise ValueError(f"t must be >= 1, got {t}")

    def prepare(self, target_cos: torch.Tensor, norms: torch.Tensor) -> Prep:
        return {"tau": cos_add(target_cos.detach(), self.hard_margin)}

    @torch.no_grad()
    def negative_sums(self, cos: torch.Tensor, prep: Prep):
        # In the cosines' dtype (the classifier widens each tile's sums to float64): fp32 counts
        # are exact up to 2^24 columns per tile.
        # where(), not a product with the mask: a NaN cosine is not hard and adds nothing.
        hard = cos > prep["tau"][:, None]
        zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
        return torch.where(hard, cos, zero).sum(dim=1), hard.to(cos.dtype).sum(dim=1)

    def negative_logits(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        hard = cos > prep["tau"][:, None]
        return torch.where(hard, cos * self.t + self.alpha, cos)

    def negative_logit_slope(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        hard = cos > prep["tau"][:, None]
        one = torch.ones((), dtype=cos.dtype, device=cos.device)
        return torch.where(hard, one * self.t, one)

    def margin(self, stats: torch.Tensor) -> torch.Tensor:
        """m_i from the all-reduced statistics (float64, no gradient)."""
        return self.m0 + self.m1 * stats[:, 0] / stats[:, 1].clamp(min=1.0)

    def positive_logit(self, target_cos, prep, stats: Optional[torch.Tensor]):
        m = self.margin(stats).to(target_cos.dtype)
        return torch.where(target_cos > 0, cos_add(target_cos, m), target_cos)

    def diagnostics(self, prep, stats):
        return {"margin": self.margin(stats), "hard_count": stats[:, 1]}

    def extra_repr(self) -> str:
        return (
            f"s={self.scale}, m0={self.m0}, m1={self.m1}, t={self.t}, alpha={self.alpha}, "
            f"hard_margin={self.hard_margin}"
        )
