"""Row-sparse SGD of the Partial FC classifier weight (see :mod:`.row_sparse`)."""
from __future__ import annotations

import torch

from .row_sparse import RowSparseOptimizer

# Parameter dtypes whose dense SGD update may run as torch's fused kernel (see
# RowSparseSGD._fused_dense_update).
FUSED_SGD_DTYPES = (torch.float32, torch.float64)


class RowSparseSGD(RowSparseOptimizer):
    """SGD with momentum (optionally Nesterov) and coupled weight decay, on the sampled rows.

    Same update as ``torch.optim.SGD`` per row: ``d = g + wd * w``; a row's first update sets its
    buffer to ``d``, later ones ``buf = momentum * buf + (1 - dampening) * d``; the step is ``buf``
    (or ``d + momentum * buf`` with Nesterov); ``w -= lr * step``.
    """

    def __init__(self, module, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
        self.row_state_keys = ("momentum_buffer",) if momentum != 0 else ()
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(module, defaults)

    def _update(self, param, rows, group):
        if rows is None:
            self._dense_update(param, group)
        else:
            self._row_update(param, rows, group)

    def _dense_update(self, param, group):
        if self._fused_dense_update(param, group):
            return
        # The same operations, in the same order, as torch.optim.SGD's single-tensor path.
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        grad = param.grad
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        if momentum != 0:
            state = self._row_state(param)
            buf, count = state["momentum_buffer"], state["step"]
            if self.uniform_step == 0:  # every row's first update
                buf.copy_(grad)
            elif self.uniform_step is not None:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            else:  # some rows fresh, some not
                updated = buf.mul(momentum).add_(grad, alpha=1 - group["dampening"])
                buf.copy_(torch.where((count == 0)[:, None], grad, updated))
            count += 1
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        else:
            self._row_state(param)["step"] += 1
        param.add_(grad, alpha=-lr)

    def _fused_dense_update(self, param, group) -> bool:
        """Every row in one pass with torch's fused SGD kernel (``torch.optim.SGD(fused=True)``:
        the same arithmetic as its single-tensor path, bit for bit, without the [rows x D]
        temporaries: 12 against 95 ms for a 100K x 512 fp32 shard on 2 CPU threads). False when
        this torch or device has no such kernel, or when some rows have a momentum buffer and
        others not (their first update copies the gradient), which the kernel cannot express.
        Also False unless ``FUSED_SGD_DTYPES`` holds the dtype (bf16/fp16: the kernel rounds
        differently from the single-tensor path, and torch 2.13's CPU kernel leaves elements
        past its first vector unchanged) and every tensor is contiguous (it walks raw memory:
        a gradient with other strides than the weight would update the wrong elements)."""
        fused_sgd = getattr(torch, "_fused_sgd_", None)
        momentum = group["momentum"]
        if (fused_sgd is None or param.dtype not in FUSED_SGD_DTYPES
                or param.grad.dtype != param.dtype):
            return False
        state = self._row_state(param)
        buffers, first = [], self.uniform_step == 0
        if momentum != 0:
            if self.uniform_step is None:
                return False
            buffers = [state["momentum_buffer"]]
        if not all(t.is_contiguous() for t in [param, param.grad, *buffers]):
            return False
        try:
            fused_sgd([param], [param.grad], buffers, weight_decay=group["weight_decay"],
                      momentum=momentum, lr=group["lr"], dampening=group["dampening"],
                      nesterov=group["nesterov"], maximize=False, is_first_step=first)
        except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
            return False
        state["step"] += 1
        return True

    def _row_update(self, param, rows, group):
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        grad = param.grad.index_select(0, rows)
        if wd != 0:
            grad = grad.add(param.index_select(0, rows), alpha=wd)
        state = self._row_state(param)
        if momentum != 0:
            buf = state["momentum_buffer"].index_select(0, rows)
            fresh = (state["step"].index_select(0, rows) == 0)[:, None]
            updated = buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            buf = torch.where(fresh, grad, updated)
            state["momentum_buffer"].index_copy_(0, rows, buf)
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        state["step"].index_add_(0, rows, torch.ones_like(rows))
        param.index_add_(0, rows, grad, alpha=-lr)
