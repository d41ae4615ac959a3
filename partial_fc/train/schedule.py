"""Learning-rate schedule: linear warm-up, then polynomial decay, both by optimizer step."""
from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, power: float = 2.0,
              min_factor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * (1.0 - progress) ** power
