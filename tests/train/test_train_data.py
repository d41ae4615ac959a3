"""Training-data plumbing: deterministic flips, the synthetic cache key, val_bins resolution."""
import pytest
from omegaconf import OmegaConf

from partial_fc.train.config import ConfigError
from partial_fc.train.data import flip_decision, resolve_val_bins, synthetic_root


def test_flip_is_a_pure_function_of_seed_epoch_and_index():
    flips = [flip_decision(0, 0, i) for i in range(2000)]
    assert flips == [flip_decision(0, 0, i) for i in range(2000)]
    assert 0.45 < sum(flips) / len(flips) < 0.55
    assert flips != [flip_decision(0, 1, i) for i in range(2000)]  # another epoch, other flips
    assert flips != [flip_decision(1, 0, i) for i in range(2000)]


def test_synthetic_cache_key_follows_the_parameters(tmp_path):
    cfg = OmegaConf.create({"cache_dir": str(tmp_path), "synthetic": {"num_identities": 10, "seed": 0}})
    other = OmegaConf.create({"cache_dir": str(tmp_path), "synthetic": {"num_identities": 10, "seed": 1}})
    assert synthetic_root(cfg.cache_dir, cfg.synthetic) == synthetic_root(cfg.cache_dir, cfg.synthetic)
    assert synthetic_root(cfg.cache_dir, cfg.synthetic) != synthetic_root(other.cache_dir, other.synthetic)
    assert synthetic_root(cfg.cache_dir, cfg.synthetic).parent == tmp_path.resolve()


def test_val_bins_resolve_names_and_paths(tmp_path):
    (tmp_path / "lfw.bin").write_bytes(b"x")
    elsewhere = tmp_path / "sub" / "agedb_30.bin"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    cfg = OmegaConf.create({"val_bins": ["lfw", str(elsewhere)]})
    assert resolve_val_bins(cfg.val_bins, tmp_path) == [(tmp_path / "lfw.bin").resolve(), elsewhere.resolve()]
    with pytest.raises(ConfigError, match="data.val_bins: 'cfp_fp' not found"):
        resolve_val_bins(OmegaConf.create({"val_bins": ["cfp_fp"]}).val_bins, tmp_path)


class PidFaces:
    """Sample i: a 2x2 image holding the serving process's PID (flip-invariant: one value per
    channel), label i; the indices in ``bad`` are bad samples (None, as on_bad_image=skip gives)."""

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        import os

        import numpy as np

        if index in self.bad:
            return None
        pid = os.getpid()
        image = np.empty((2, 2, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = pid >> 16 & 255, pid >> 8 & 255, pid & 255
        return image, index


def _pids(images):
    px = images[:, 0, 0].long()
    return set((px[:, 0] << 16 | px[:, 1] << 8 | px[:, 2]).tolist())


def _stream(dataset, num_workers=0, batch_size=4, seed=5):
    from partial_fc.data import DistributedShardSampler
    from partial_fc.train.data import AugmentedFaces, BatchStream

    sampler = DistributedShardSampler(len(dataset), 1, 0, shuffle=True, seed=seed)
    return BatchStream(AugmentedFaces(dataset, seed=seed), sampler, batch_size, num_workers=num_workers)


def test_one_data_loader_and_its_workers_serve_every_epoch():
    stream = _stream(PidFaces(12), num_workers=2)
    try:
        pids, epochs = set(), []
        for epoch in range(3):
            labels = []
            for _ in range(3):  # 12 samples / batch 4
                images, batch_labels = stream.next()
                pids |= _pids(images)
                labels += batch_labels.tolist()
                stream.advance(4)
            epochs.append(labels)
        assert all(sorted(labels) == list(range(12)) for labels in epochs)
        assert epochs[0] != epochs[1] != epochs[2]  # each epoch in its own order
        assert len(pids) == 2  # the same two workers throughout: no re-fork per epoch
    finally:
        stream.close()


def test_a_bad_sample_is_replaced_by_the_same_substitute_in_full_batches_after_a_resume():
    bad = {1, 6, 7}
    straight = _stream(PidFaces(12, bad))
    batches = []
    for _ in range(6):  # two epochs
        _, labels = straight.next()
        assert len(labels) == 4
        batches.append(labels.tolist())
        straight.advance(4)
    served = [label for batch in batches[:3] for label in batch]
    assert not bad & set(served) and set(range(12)) - bad <= set(served)  # every good one, no bad one
    resumed = _stream(PidFaces(12, bad))
    resumed.sampler.load_state_dict({**straight.sampler.state_dict(), "epoch": 0, "position": 4})
    again = []
    for _ in range(5):
        _, labels = resumed.next()
        again.append(labels.tolist())
        resumed.advance(4)
    assert again == batches[1:]


def test_substitutes_are_other_samples_drawn_from_seed_epoch_and_index():
    from partial_fc.train.data import substitute_index

    draws = [substitute_index(3, 0, i, 0, 50) for i in range(50)]
    assert all(0 <= d < 50 and d != i for i, d in enumerate(draws))
    assert draws == [substitute_index(3, 0, i, 0, 50) for i in range(50)]
    assert draws != [substitute_index(3, 1, i, 0, 50) for i in range(50)]  # another epoch
    assert len({substitute_index(3, 0, 7, attempt, 50) for attempt in range(16)}) > 8  # tries differ
    assert substitute_index(0, 0, 0, 0, 2) == 1 and substitute_index(0, 0, 1, 0, 2) == 0


def test_a_data_set_whose_substitutes_are_all_bad_says_it_is_unreadable():
    from partial_fc.data import BadSampleError

    stream = _stream(PidFaces(12, bad=set(range(12))))
    with pytest.raises(BadSampleError, match=r"sample \d+ is bad \(data\.on_bad_image=skip\) and so were the 16 "
                                             r"samples tried in its place"):
        stream.next()
