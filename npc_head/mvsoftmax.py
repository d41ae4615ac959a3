"""MV-Softmax: mis-classified vector guided softmax (Wang et al., AAAI 2020)."""
from __future__ import annotations

import math

import torch

from .base import MarginHead, Prep, cos_add


class MVSoftmax(MarginHead):
    """MV-Softmax head (MV-Arc-Softmax with ``arc=True``, MV-AM-Softmax with ``arc=False``).

    For a row with target cosine c_y and negative cosines c_k (k != y):

    - ``arc=True``: the positive logit is cos(theta_y + m) where c_y > 0, else c_y (the easy-margin
      form of the authors' code); a negative is mis-classified ("hard") when
      c_k > cos(theta_y + m);
    - ``arc=False``: the positive logit is c_y - m; a negative is hard when c_k > c_y - m;
    - a hard negative's logit is t c_k + t - 1 (the paper's adaptive weight,
      h = exp(s (t - 1)(c_k + 1))), or with ``fixed=True`` c_k + t - 1 (the fixed weight,
      h = exp(s (t - 1))); other negatives keep c_k;

    all scaled by ``s``. The authors' code writes the same thing with t' = t - 1
    ("(t' + 1) c + t'" adaptive, "c + t'" fixed, t' = 0.2 by default). With ``arc=True`` and
    the adaptive weight this equals NPCFace with m1 = 0, alpha = t - 1, hard_margin = m0 = m.
    Source: Wang et al., arXiv:1912.00833, and the authors' FaceX-Zoo head; docs/ALGORITHM.md,
    section 3.
    """

    def __init__(self, s=32.0, m=0.35, t=1.2, arc=True, fixed=False):
        super().__init__(s)
        if not 0 <= m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        if not t >= 1:
            raise ValueError(f"t must be >= 1, got {t}")
        self.m, self.t = float(m), float(t)
        self.arc, self.fixed = bool(arc), bool(fixed)

    def prepare(self, target_cos: torch.Tensor, norms: torch.Tensor) -> Prep:
        c = target_cos.detach()
        return {"tau": cos_add(c, self.m) if self.arc else c - self.m}

    def _hard(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        return cos > prep["tau"][:, None]

    def negative_logits(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        weight = 1.0 if self.fixed else self.t
        return torch.where(self._hard(cos, prep), cos * weight + (self.t - 1.0), cos)

    def negative_logit_slope(self, cos: torch.Tensor, prep: Prep) -> torch.Tensor:
        one = torch.ones((), dtype=cos.dtype, device=cos.device)
        return torch.where(self._hard(cos, prep), one * (1.0 if self.fixed else self.t), one)

    def positive_logit(self, target_cos, prep, stats):
        if not self.arc:
            return target_cos - self.m
        return torch.where(target_cos > 0, cos_add(target_cos, self.m), target_cos)

    def extra_repr(self) -> str:
        return f"s={self.scale}, m={self.m}, t={self.t}, arc={self.arc}, fixed={self.fixed}"
