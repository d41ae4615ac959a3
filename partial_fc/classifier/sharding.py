"""How the identity classes are split across ranks."""
from __future__ import annotations


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Return ``(start, count)`` of the contiguous block of classes owned by ``rank``.

    The first ``num_classes % world_size`` ranks own one class more than the others, so
    ``count = C // W + (rank < C % W)`` and ``start = rank * (C // W) + min(rank, C % W)``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    return start, count
