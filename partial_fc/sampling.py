"""Partial FC class sampling: the positives of the batch plus uniformly random negatives."""
from __future__ import annotations

import numpy as np
import torch


def sampling_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed derived from (seed, rank, step), so runs repeat and ranks differ."""
    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_classes(
    positives: torch.Tensor, num_local: int, num_sample: int, generator: torch.Generator
) -> torch.Tensor:
    """Sorted local row indices: all ``positives`` plus random negatives, ``num_sample`` in all.

    When there are more positives than ``num_sample`` every positive is kept and nothing else.
    Negatives are uniform among the rows that are not positives.
    """
    device = positives.device
    if positives.numel() >= num_sample:
        return torch.unique(positives)
    scores = torch.rand(num_local, generator=generator, device=generator.device).to(device)
    scores[positives] = 2.0  # above any uniform draw: positives always win
    return torch.topk(scores, num_sample, sorted=False).indices.sort().values
