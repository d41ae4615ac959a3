"""Distributed sampling with exact, world-size-independent resume."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["DistributedShardSampler"]


class DistributedShardSampler(Sampler):
    """Each rank draws a disjoint shard of an epoch's (seeded) permutation of the dataset.

    **Epoch order.** Epoch ``e`` orders the dataset by ``torch.randperm(dataset_len)`` drawn from
    a generator seeded with ``seed + e`` (identity order with ``shuffle=False``). Every rank
    computes the same order; nothing is communicated.

    **Position.** ``position`` counts how many samples of that order the whole job (all ranks
    together) has consumed. Samples not yet consumed, ``order[position:]``, are dealt round-robin:
    rank ``r`` of ``W`` gets ``remaining[r::W]``. With ``drop_last=True`` the remaining list is
    cut to a multiple of ``W``; otherwise it is padded with samples from the start of the epoch's
    order so every rank gets the same count.

    **Advancing (who counts).** Iterating does *not* move the position: a DataLoader prefetches
    indices ahead of what training has used. The training loop calls ``advance(n)`` after each
    step, with ``n`` the number of samples *this rank* consumed in that step (its local batch size);
    the global position moves by ``n * num_replicas`` (every rank consumes the same count, since
    the shards are equal). ``state_dict()`` then records ``{epoch, position, ...}``; loading it
    into a new sampler (for the same dataset length, seed and shuffle) and iterating yields exactly
    the samples that had not been consumed, on any world size: the remaining list is re-dealt among
    the new ranks.

    Typical loop::

        sampler = DistributedShardSampler(len(ds), world_size, rank, seed=seed)
        sampler.load_state_dict(ckpt["sampler"])          # when resuming
        for epoch in range(sampler.epoch, epochs):
            sampler.set_epoch(epoch)                       # keeps the position if epoch is unchanged
            for images, labels in DataLoader(ds, batch_size=b, sampler=sampler, drop_last=True):
                step(...)
                sampler.advance(len(labels))
                ckpt["sampler"] = sampler.state_dict()

    ``len(sampler)`` is the number of indices the next ``iter(sampler)`` yields on this rank.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.dataset_len = int(dataset_len)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0

    # ------------------------------------------------------------------ epoch order
    def epoch_order(self, epoch: int = None) -> torch.Tensor:
        """The permutation of ``range(dataset_len)`` used by ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        g = torch.Generator()
        g.manual_seed(self.seed + int(epoch))
        return torch.randperm(self.dataset_len, generator=g)

    def _remaining_count(self) -> int:
        """Length of the remaining list after the drop_last cut or the padding."""
        rem = max(self.dataset_len - self.position, 0)
        w = self.num_replicas
        if self.drop_last:
            return rem - rem % w
        if rem == 0:
            return 0
        return -(-rem // w) * w

    def _indices(self) -> torch.Tensor:
        order = self.epoch_order()
        remaining = order[self.position :]
        total = self._remaining_count()
        if total <= remaining.numel():
            remaining = remaining[:total]
        else:
            pad = total - remaining.numel()
            reps = -(-pad // max(self.dataset_len, 1))
            remaining = torch.cat([remaining, order.repeat(reps)[:pad]])
        return remaining[self.rank :: self.num_replicas]

    # ------------------------------------------------------------------ Sampler API
    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return self._remaining_count() // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the position restarts at 0 unless ``epoch`` is the current one."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def advance(self, num_local_samples: int) -> None:
        """Record that this rank consumed ``num_local_samples`` more samples (one step's batch).

        Moves the global position by ``num_local_samples * num_replicas``; never past the end.
        """
        if num_local_samples < 0:
            raise ValueError(f"num_local_samples must be >= 0, got {num_local_samples}")
        self.position = min(self.position + int(num_local_samples) * self.num_replicas, self.dataset_len)

    @property
    def exhausted(self) -> bool:
        """True when this epoch has nothing left to yield."""
        return len(self) == 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Epoch, global position and the settings that define the order."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "dataset_len": self.dataset_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from any world size). The dataset length, seed and shuffle
        must match, or the remaining samples would be different ones: that raises ValueError."""
        for name in ("dataset_len", "seed", "shuffle"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"sampler state has {name}={state[name]!r} but this sampler has "
                    f"{name}={getattr(self, name)!r}"
                )
        position = int(state["position"])
        if not 0 <= position <= self.dataset_len:
            raise ValueError(f"sampler state position {position} outside [0, {self.dataset_len}]")
        self.epoch = int(state["epoch"])
        self.position = position

    def __repr__(self):
        return (
            f"DistributedShardSampler(dataset_len={self.dataset_len}, rank={self.rank}/"
            f"{self.num_replicas}, epoch={self.epoch}, position={self.position})"
        )
