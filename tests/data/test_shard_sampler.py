"""DistributedShardSampler: disjoint shards, seeded order, exact resume (also on another world size)."""
from __future__ import annotations

import hashlib
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from partial_fc.data import DistributedShardSampler, FaceRecordDataset


def _shards(n, world, **kw):
    return [list(DistributedShardSampler(n, world, r, **kw)) for r in range(world)]


@pytest.mark.parametrize("n", [1, 7, 10, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_epoch(n, world):
    shards = _shards(n, world, seed=5, drop_last=True)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == len(flat) == n - n % world  # disjoint, only the remainder dropped
    assert len({len(s) for s in shards}) == 1
    assert all(len(s) == len(DistributedShardSampler(n, world, 0, drop_last=True)) for s in shards)
    padded = _shards(n, world, seed=5, drop_last=False)
    counts = Counter(i for s in padded for i in s)
    assert set(counts) == set(range(n)) and sum(counts.values()) == -(-n // world) * world


def test_order_is_seeded_and_changes_per_epoch():
    a, b = DistributedShardSampler(50, 2, 0, seed=1), DistributedShardSampler(50, 2, 0, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(list(a) + list(DistributedShardSampler(50, 2, 1, seed=1))) != []
    assert list(DistributedShardSampler(6, 2, 0, shuffle=False)) == [0, 2, 4]
    # the epoch order is a permutation drawn from seed + epoch
    g = torch.Generator().manual_seed(1 + 1)
    assert a.epoch_order().tolist() == torch.randperm(50, generator=g).tolist()


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_on_the_same_world_size(drop_last):
    world, n, batch = 3, 29, 2
    full = _shards(n, world, seed=9, drop_last=drop_last)
    states = []
    for r in range(world):
        s = DistributedShardSampler(n, world, r, seed=9, drop_last=drop_last)
        it = iter(s)
        for _ in range(3):  # three steps of two samples
            [next(it) for _ in range(batch)]
            s.advance(batch)
        states.append(s.state_dict())
    for r in range(world):
        resumed = DistributedShardSampler(n, world, r, seed=9, drop_last=drop_last)
        resumed.load_state_dict(states[r])
        resumed.set_epoch(0)  # the loop's usual call: same epoch keeps the position
        assert list(resumed) == full[r][3 * batch :]
        assert len(resumed) == len(full[r]) - 3 * batch


def test_resume_on_another_world_size():
    n = 40
    old = [DistributedShardSampler(n, 2, r, seed=4) for r in range(2)]
    consumed = []
    for s in old:
        consumed += list(s)[:6]
        s.advance(6)
    state = old[0].state_dict()
    assert state["position"] == 12
    new = [DistributedShardSampler(n, 3, r, seed=4) for r in range(3)]
    for s in new:
        s.load_state_dict(state)
    rest = [i for s in new for i in s]
    order = old[0].epoch_order().tolist()
    assert sorted(consumed) == sorted(order[:12])
    assert sorted(rest) == sorted(order[12 : 12 + (n - 12) // 3 * 3])  # the remaining samples, once
    assert not set(rest) & set(consumed)


def test_epoch_change_and_state_validation():
    s = DistributedShardSampler(10, 2, 1, seed=0)
    s.advance(3)
    assert s.position == 6
    s.set_epoch(1)
    assert (s.epoch, s.position) == (1, 0)
    s.advance(100)
    assert s.position == 10 and len(s) == 0 and list(s) == []
    with pytest.raises(ValueError, match="dataset_len"):
        DistributedShardSampler(11, 2, 0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="rank"):
        DistributedShardSampler(10, 2, 2)


def _keys(loader):
    return [int(k) for _, _, keys in loader for k in keys]


def test_dataloader_two_workers_two_ranks_exact_cover_and_resume(synthetic_small):
    ds = FaceRecordDataset(synthetic_small, return_key=True)
    assert len(ds) == 40
    world, batch = 2, 4
    per_rank = []
    for rank in range(world):
        sampler = DistributedShardSampler(len(ds), world, rank, seed=11)
        sampler.set_epoch(2)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=2)
        per_rank.append(_keys(loader))
    flat = [k for keys in per_rank for k in keys]
    assert sorted(flat) == list(range(1, 41))  # every image exactly once
    # the pixels really are 40 different images
    digests = {hashlib.sha256(ds[i][0].tobytes()).hexdigest() for i in range(len(ds))}
    assert len(digests) == 40

    for rank in range(world):
        sampler = DistributedShardSampler(len(ds), world, rank, seed=11)
        sampler.set_epoch(2)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=2)
        seen = []
        for step, (_, labels, keys) in enumerate(loader):
            seen += keys.tolist()
            sampler.advance(len(labels))
            if step == 1:
                state = sampler.state_dict()
                break
        resumed = DistributedShardSampler(len(ds), world, rank, seed=11)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)
        rest = _keys(DataLoader(ds, batch_size=batch, sampler=resumed, num_workers=2))
        assert seen + rest == per_rank[rank]
