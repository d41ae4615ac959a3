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
