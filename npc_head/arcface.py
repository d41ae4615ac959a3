"""ArcFace (additive angular margin) and CosFace (additive cosine margin)."""
from __future__ import annotations

import math

import torch

from .base import MarginHead, cos_add


class ArcFace(MarginHead):
    """ArcFace: target logit cos(theta_y + m) where c_y > cos(pi - m), else c_y - m sin(pi - m).

    The fallback keeps the logit monotonic in theta_y past pi - m (the standard form); gradients
    are exact (no straight-through trick). Source: Deng et al., arXiv:1801.07698, and
    insightface's ``CombinedMarginLoss``; docs/ALGORITHM.md, section 3.
    """

    def __init__(self, s=64.0, m=0.5):
        super().__init__(s)
        if not 0 <= m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        self.m = float(m)
        self.threshold = math.cos(math.pi - self.m)
        self.fallback = math.sin(math.pi - self.m) * self.m

    def positive_logit(self, target_cos, prep, stats):
        return torch.where(
            target_cos > self.threshold, cos_add(target_cos, self.m), target_cos - self.fallback
        )

    def extra_repr(self) -> str:
        return f"s={self.scale}, m={self.m}"


class CosFace(MarginHead):
    """CosFace: target logit c_y - m (Wang et al., arXiv:1801.09414; docs/ALGORITHM.md,
    section 3)."""

    def __init__(self, s=64.0, m=0.4):
        super().__init__(s)
        self.m = float(m)

    def positive_logit(self, target_cos, prep, stats):
        return target_cos - self.m

    def extra_repr(self) -> str:
        return f"s={self.scale}, m={self.m}"
