"""Row-sparse optimizers for the Partial FC classifier weight.

With ``sample_rate < 1`` a step scores only some rows of the weight shard (``module.sampled_index``
of the last forward; with gradient accumulation, the union over the step's forwards, see
``PartialFC.rows_to_update``). These optimizers update those rows and nothing else: the other rows keep
their values, their momentum / moments and their weight decay untouched, as in the Partial FC
paper (An et al., 2021). The work per step is proportional to the sampled rows. When a step
samples every row the update is exactly that of ``torch.optim.SGD`` / ``torch.optim.AdamW``.

Every per-row state tensor has the rows as its first dimension (``[num_local, ...]``), including
the per-row update count ``step``, so a checkpoint can be re-sharded by rows. Both classes are
``torch.optim.Optimizer`` subclasses: ``param_groups[0]["lr"]`` is what LR schedulers drive.

A step reads nothing back from the device: whether every row has the same update count (which
selects torch's exact dense update) is kept on the host, ``uniform_step``, and read from the
state only when a state dict is loaded.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .collectives import host_values


class RowSparseOptimizer(torch.optim.Optimizer):
    """Base class: resolves which rows a step updates and keeps the per-row state consistent.

    The rows of a step are ``module.rows_to_update()``: every row sampled by a training forward
    since the last ``step()`` or ``zero_grad()`` (both reset it), so gradient accumulation over
    several forwards updates the union of their rows.

    Args:
        module: the :class:`partial_fc.PartialFC` whose ``weight`` is optimised.
        defaults: hyper-parameters of the single param group.
    """

    row_state_keys: Tuple[str, ...] = ()

    def __init__(self, module: nn.Module, defaults: dict):
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise TypeError(
                f"{type(self).__name__} needs a module with a `weight` parameter (a PartialFC), "
                f"got {type(module).__name__}"
            )
        if float(defaults.get("lr", 0.0)) < 0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        if float(defaults.get("weight_decay", 0.0)) < 0:
            raise ValueError(f"weight_decay must be >= 0, got {defaults['weight_decay']}")
        super().__init__([module.weight], defaults)
        self.module = module
        # The update count every row shares (None: the rows' counts differ), kept on the host.
        self.uniform_step: Optional[int] = 0

    def _rows(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows to update this step, or None for every row."""
        rows_to_update = getattr(self.module, "rows_to_update", None)
        if rows_to_update is not None:
            index = rows_to_update()
        else:
            index = getattr(self.module, "sampled_index", None)
        if index is None or index.numel() == param.shape[0]:
            return None
        return index.to(param.device)

    def _consumed(self) -> None:
        reset = getattr(self.module, "reset_rows_to_update", None)
        if reset is not None:
            reset()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._consumed()

    def _row_state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
            for key in self.row_state_keys:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Update the rows of this step (every row when all were sampled) and reset them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} expects a dense gradient")
                rows = self._rows(param)
                self._update(param, rows, group)
                self._counted(rows)
        self._consumed()
        return loss

    def _update(self, param, rows: Optional[torch.Tensor], group: dict) -> None:
        """Apply the rule to ``rows`` of ``param`` (None: every row) and add 1 to their
        ``step``."""
        raise NotImplementedError

    def _counted(self, rows: Optional[torch.Tensor]) -> None:
        if self.uniform_step is not None:
            self.uniform_step = self.uniform_step + 1 if rows is None else None

    def load_state_dict(self, state_dict: dict) -> None:
        """Load state, checking that every per-row tensor has this shard's row count."""
        rows = self.module.weight.shape[0]
        for key, param_state in state_dict.get("state", {}).items():
            for name, value in param_state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] != rows:
                    raise ValueError(
                        f"optimizer state {name!r} of param {key} has {value.shape[0]} rows, this "
                        f"shard has {rows}: re-shard the classifier state by rows first"
                    )
        super().load_state_dict(state_dict)
        param = self.module.weight
        for state in self.state.values():
            if "step" in state:  # torch leaves "step" on its saved device and dtype
                state["step"] = state["step"].to(device=param.device, dtype=torch.int64)
        steps = self.state[param].get("step") if param in self.state else None
        if steps is None or steps.numel() == 0:
            self.uniform_step = 0
        else:
            low, high = host_values(torch.stack([steps.min(), steps.max()]))
            self.uniform_step = low if low == high else None


