"""CurricularFace: adaptive curriculum learning loss (Huang et al., CVPR 2020)."""
from __future__ import annotations

import math

import torch

from .base import MarginHead, Prep, cos_add


class CurricularFace(MarginHead):
    """CurricularFace head.

    For a row with target cosine c_y and negative cosines c_k (k != y):

    - positive logit cos(theta_y + m) where c_y > cos(pi - m), else c_y - m sin(pi - m)
      (ArcFace's monotonic fallback, as the authors' code);
    - a negative is hard when c_k > cos(theta_y + m) and its logit is then c_k (t + c_k);
      other negatives keep c_k;
    - t is a running average of the mean target cosine, t <- momentum * mean(c_y) +
      (1 - momentum) * t, starting at 0.

    t is the buffer ``t`` (so it is in ``state_dict`` and in the trainer's checkpoint). Like the
    authors' code it is updated in training mode, once per forward, *before* the current batch's
    negative logits use it; evaluation mode leaves it alone. The mean runs over the global batch:
    ``prepare`` receives the target cosines after the classifier's all-reduce, and since every
    row has exactly one non-zero contribution (its owner's) that sum is exact, so every rank sees
    bit-identical target cosines, computes the same mean and keeps the same t without a
    collective of its own. Source: Huang et al., arXiv:2004.00288, and the authors' code;
    docs/ALGORITHM.md, section 3.
    """

    def __init__(self, s=64.0, m=0.5, momentum=0.01):
        super().__init__(s)
        if not 0 <= m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.m, self.momentum = float(m), float(momentum)
        self.threshold = math.cos(math.pi - self.m)
        self.fallback = math.sin(math.pi - self.m) * self.m
        self.register_buffer("t", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update_t(self, target_cos: torch.Tensor) -> None:
        """One step of the running average from the global batch's target cosines."""
        if target_cos.numel() == 0:
            return
        mean = target_cos.detach().to(torch.float64).mean()
        self.t.copy_(self.momentum * mean + (1.0 - self.momentum) * self.t.to(torch.float64))

    def prepare(self, target_cos: torch.Tensor, norms: torch.Tensor) -> Prep:
        c = target_cos.detach()
        if self.training:
            self.update_t(c)
        t = self.t.detach().to(c.dtype).expand(c.shape[0]).clone()
        return {"tau": cos_add(c, self.m), "t": t}

    def _hard(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        return cos > prep["tau"][:, None]

    def negative_logits(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        return torch.where(self._hard(cos, prep), cos * (prep["t"][:, None] + cos), cos)

    def negative_logit_slope(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        one = torch.ones((), dtype=cos.dtype, device=cos.device)
        return torch.where(self._hard(cos, prep), prep["t"][:, None] + 2.0 * cos, one)

    def positive_logit(self, target_cos, prep, stats):
        return torch.where(
            target_cos > self.threshold, cos_add(target_cos, self.m), target_cos - self.fallback
        )

    def diagnostics(self, prep, stats):
        return {"t": prep["t"]}

    def extra_repr(self) -> str:
        return f"s={self.scale}, m={self.m}, momentum={self.momentum}"
