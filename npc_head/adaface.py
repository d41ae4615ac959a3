"""AdaFace: quality-adaptive margins from the embedding norms (Kim, Jain, Liu, CVPR 2022)."""
from __future__ import annotations

import math

import torch

from .base import MarginHead, Prep

EPS = 1e-3  # the authors' stability epsilon (cosine clamp, angle clip, std floor)
NORM_RANGE = (0.001, 100.0)  # the authors' clip of the embedding norms


class AdaFace(MarginHead):
    """AdaFace head, as the authors' code (github mk-minchul/AdaFace, ``head.py``) computes it.

    For a row with embedding norm n_i, target cosine c_y and negative cosines c_k:

    - n_i is clipped to [0.001, 100]; in training mode the buffers ``batch_mean`` (starting at
      20) and ``batch_std`` (starting at 100) first move towards the global batch's mean and
      unbiased standard deviation of the clipped norms: b <- t_alpha * x + (1 - t_alpha) * b;
    - z_i = clip((n_i - batch_mean) / (batch_std + 1e-3) * h, -1, 1), without gradient;
    - target logit cos(clip(theta_y - m z_i, 1e-3, pi - 1e-3)) - (m + m z_i), theta_y the angle
      of c_y clamped to [-1 + 1e-3, 1 - 1e-3];
    - negatives keep c_k;

    all scaled by ``s``. Every rank sees the same global batch norms and updates the buffers
    identically (they are checkpointed with the head). A batch of one row leaves them alone
    (its standard deviation is undefined). Source: Kim, Jain, Liu, arXiv:2204.00964, and the
    authors' code; docs/ALGORITHM.md, section 3.
    """

    def __init__(self, s=64.0, m=0.4, h=0.333, t_alpha=1.0):
        super().__init__(s)
        if not 0 <= m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        if not h >= 0:
            raise ValueError(f"h must be >= 0, got {h}")
        if not 0 < t_alpha <= 1:
            raise ValueError(f"t_alpha must be in (0, 1], got {t_alpha}")
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    @torch.no_grad()
    def update_statistics(self, norms: torch.Tensor) -> None:
        """One step of the running mean and std from the global batch's norms [Bg]."""
        if norms.numel() < 2:
            return
        safe = norms.detach().to(torch.float64).clamp(*NORM_RANGE)
        a = self.t_alpha
        self.batch_mean.copy_(a * safe.mean() + (1.0 - a) * self.batch_mean.to(torch.float64))
        self.batch_std.copy_(a * safe.std() + (1.0 - a) * self.batch_std.to(torch.float64))

    def prepare(self, target_cos: torch.Tensor, norms: torch.Tensor) -> Prep:
        if self.training:
            self.update_statistics(norms)
        safe = norms.detach().to(target_cos.dtype).clamp(*NORM_RANGE)
        mean, std = (b.to(target_cos.dtype) for b in (self.batch_mean, self.batch_std))
        return {"z": ((safe - mean) / (std + EPS) * self.h).clamp(-1.0, 1.0)}

    def positive_logit(self, target_cos, prep, stats):
        z = prep["z"]
        theta = torch.acos(target_cos.clamp(-1.0 + EPS, 1.0 - EPS))
        return torch.cos((theta - self.m * z).clamp(EPS, math.pi - EPS)) - self.m * (1.0 + z)

    def diagnostics(self, prep, stats):
        return {"margin_scaler": prep["z"]}

    def extra_repr(self) -> str:
        return f"s={self.scale}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"
