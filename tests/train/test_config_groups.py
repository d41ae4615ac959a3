"""Every config group member composes and validates; bad values fail naming the key."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from partial_fc.train.config import ConfigError, validate_config

CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def _members(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "model", "head", "optim", "trainer", "experiment"])
def test_every_member_composes_and_validates(group):
    members = _members(group)
    assert members, f"conf/{group} is empty"
    for member in members:
        overrides = [f"experiment={member}"] if group == "experiment" else [f"{group}={member}"]
        if group == "data" and member in ("folder", "rec"):
            overrides.append("data.root=/some/faces")
        cfg = _compose(overrides)
        OmegaConf.resolve(cfg)
        validate_config(cfg)


def test_required_groups_and_defaults():
    cfg = _compose()
    assert cfg.data.name == "synthetic" and cfg.model.name == "tiny" and cfg.head.name == "npcface"
    assert cfg.trainer.device == "cpu"


def test_experiment_presets_override_groups():
    cfg = _compose(["experiment=ms1mv3_r100_npcface"])
    assert (cfg.data.name, cfg.model.name, cfg.trainer.device) == ("ms1mv3", "r100", "cuda")
    assert cfg.data.num_classes == 93431


@pytest.mark.parametrize(
    "override,key",
    [
        ("head.sample_rate=1.5", "head.sample_rate"),
        ("head.sample_rate=0", "head.sample_rate"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.stop_at=100000", "trainer.stop_at"),
        ("head.impl=fast", "head.impl"),
        ("optim.lr=-1", "optim.lr"),
        ("data.num_classes=-3", "data.num_classes"),
        ("trainer.grad_accum=0", "trainer.grad_accum"),
        ("data.label_check=maybe", "data.label_check"),
        ("trainer.max_consecutive_skips=-1", "trainer.max_consecutive_skips"),
    ],
)
def test_bad_values_name_the_key(override, key):
    cfg = _compose([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_unknown_group_member_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="model"):
        _compose(["model=r1000"])


def test_folder_data_needs_a_root():
    cfg = _compose(["data=folder"])
    with pytest.raises(ConfigError, match=r"data\.root"):
        validate_config(cfg)


def test_own_recordio_set_is_data_rec_with_its_root():
    with pytest.raises(ConfigError, match=r"data\.root"):
        validate_config(_compose(["data=rec"]))
    cfg = _compose(["data=rec", "data.root=/my/set"])
    validate_config(cfg)
    assert (cfg.data.format, cfg.data.num_classes, cfg.data.label_check) == ("recordio", None, "warn")
