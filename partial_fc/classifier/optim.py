"""The row-sparse optimizers of the classifier weight, by their config names
(``optim.name``): :class:`RowSparseSGD`, :class:`RowSparseAdamW` (:mod:`.row_sparse`)."""
from __future__ import annotations

from typing import Tuple

from torch import nn

from .adamw import RowSparseAdamW
from .row_sparse import RowSparseOptimizer
from .sgd import FUSED_SGD_DTYPES, RowSparseSGD

__all__ = ["OPTIMIZERS", "build_classifier_optimizer", "RowSparseOptimizer", "RowSparseSGD",
           "RowSparseAdamW", "FUSED_SGD_DTYPES"]

OPTIMIZERS = ("sgd", "adamw")


def build_classifier_optimizer(
    module: nn.Module,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = False,
    dampening: float = 0.0,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> RowSparseOptimizer:
    """The row-sparse optimizer of a PartialFC's weight: ``"sgd"`` (``momentum``, ``nesterov``,
    ``dampening``, coupled ``weight_decay``) or ``"adamw"`` (``betas``, ``eps``, decoupled
    ``weight_decay``; ``momentum`` is ignored)."""
    key = str(name).lower()
    if key == "sgd":
        return RowSparseSGD(module, lr=lr, momentum=momentum, dampening=dampening,
                            weight_decay=weight_decay, nesterov=nesterov)
    if key == "adamw":
        return RowSparseAdamW(module, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown classifier optimizer {name!r}; expected one of {OPTIMIZERS}")
