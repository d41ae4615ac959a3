"""Row-sparse AdamW of the Partial FC classifier weight (see :mod:`.row_sparse`)."""
from __future__ import annotations

import torch

from .row_sparse import RowSparseOptimizer


class RowSparseAdamW(RowSparseOptimizer):
    """AdamW (decoupled weight decay) on the sampled rows, with per-row bias correction.

    Each row counts its own updates, so a row's moments and bias correction are those of a plain
    AdamW that saw only the steps in which the row was sampled ("lazy" Adam); decay applies only
    to updated rows. With every row sampled each step this is ``torch.optim.AdamW``.
    """

    row_state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, module, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        beta1, beta2 = (float(b) for b in betas)
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        super().__init__(module, defaults)

    def _update(self, param, rows, group):
        state = self._row_state(param)
        if rows is None and self.uniform_step is not None:
            self._uniform_update(param, state, group)
        else:
            if rows is None:
                rows = torch.arange(param.shape[0], device=param.device)
            self._row_update(param, rows, state, group)

    def _uniform_update(self, param, state, group):
        # Every row at the same step count: torch.optim.AdamW's single-tensor path, verbatim math.
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = self.uniform_step + 1
        if wd != 0:
            param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def _row_update(self, param, rows, state, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        grad = param.grad.index_select(0, rows)
        value = param.index_select(0, rows)
        exp_avg = state["exp_avg"].index_select(0, rows)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
        step = state["step"].index_select(0, rows) + 1
        if wd != 0:
            value.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exponent = step.to(torch.float64)
        bias_correction1 = 1 - torch.pow(beta1, exponent)
        bias_correction2 = 1 - torch.pow(beta2, exponent)
        step_size = (lr / bias_correction1).to(param.dtype)[:, None]
        denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt().to(param.dtype)[:, None]).add_(eps)
        value.sub_(step_size * exp_avg / denom)
        param.index_copy_(0, rows, value)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        state["step"].index_copy_(0, rows, step)
