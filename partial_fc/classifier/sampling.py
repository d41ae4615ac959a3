"""Partial FC class sampling: the positives of the batch plus uniformly random negatives
(An et al., arXiv:2010.05222; docs/ALGORITHM.md, section 6)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def sampling_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed derived from (seed, rank, step), so runs repeat and ranks differ."""
    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def positive_rows(local_labels: torch.Tensor, num_local: int) -> torch.Tensor:
    """[num_local] bool: the rows of this shard that some label of ``local_labels`` (labels
    minus the shard's first class; others outside [0, num_local) are ignored) names."""
    owned = (local_labels >= 0) & (local_labels < num_local)
    counts = torch.zeros(num_local, dtype=torch.int64, device=local_labels.device)
    counts.index_add_(0, local_labels.clamp(0, max(num_local - 1, 0)), owned.to(torch.int64))
    return counts > 0


def sample_classes(is_positive: torch.Tensor, num_sample: int, generator: torch.Generator,
                   num_positive: Optional[int] = None) -> torch.Tensor:
    """Sorted local row indices [k] int64: every positive row plus uniformly random negatives
    (without replacement), ``k = max(num_sample, num_positive)``: exactly the positives when
    they alone exceed ``num_sample``.

    ``is_positive`` [num_local] bool (:func:`positive_rows`); ``num_positive`` its count when
    it may exceed ``num_sample`` (the caller reads it from the device), None when it cannot
    (no more labels than ``num_sample``). No host synchronisation happens here.
    """
    scores = torch.rand(is_positive.shape[0], generator=generator, device=generator.device)
    scores = scores.to(is_positive.device).masked_fill_(is_positive, 2.0)  # positives always win
    k = num_sample if num_positive is None else max(num_sample, int(num_positive))
    return torch.topk(scores, k, sorted=False).indices.sort().values
