"""Each choice is registered once: the config validator's names are the factories', a head's
config keys are its constructor's, and trainer/gpu.yaml differs from cpu.yaml only where it says."""
import inspect
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import npc_head
from partial_fc.models import get_model
from partial_fc.models.factory import MODEL_NAMES
from partial_fc.optim import build_classifier_optimizer
from partial_fc import PartialFC
from partial_fc.train import builders
from partial_fc.train.config import ConfigError, validate_config

CONF = Path(__file__).resolve().parents[2] / "conf"

# The composed `trainer=gpu` group as gpu.yaml spelled out all its keys (before it inherited
# cpu.yaml): inheriting must not change one value.
GPU_TRAINER = {
    "channels_last": True, "checkpoint_every": 2000, "clip_grad_norm": 5.0, "collective_timeout_s": 1800,
    "compile": False, "deterministic": False, "device": "cuda", "dump_margins_every": 0, "grad_accum": 1,
    "init_timeout_s": 900, "keep_checkpoints": 3, "log_every": 50, "max_consecutive_skips": 25,
    "max_steps": 100000, "precision": "bf16", "preflight": "on", "preflight_budget_s": 5,
    "preflight_max_comm_share": 0.5, "preflight_slow_link": 0.25, "progress_bar": True, "resume": "auto", "seed": 0,
    "stop_at": None, "stop_file": "${oc.env:PFC_STOP_FILE,null}", "stop_poll_s": 5, "stop_signal": "SIGUSR1",
    "threads": None, "val_batch_size": 256, "val_every": 2000,
}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _raw(group, member):
    return yaml.safe_load((CONF / group / f"{member}.yaml").read_text())


def test_gpu_trainer_composes_to_the_snapshot_and_lists_only_what_differs():
    composed = OmegaConf.to_container(_compose(["trainer=gpu"]).trainer, resolve=False)
    assert composed == GPU_TRAINER
    cpu, gpu = _raw("trainer", "cpu"), _raw("trainer", "gpu")
    own = {k: v for k, v in gpu.items() if k != "defaults"}
    assert own and all(cpu[k] != v for k, v in own.items()), "gpu.yaml repeats a cpu.yaml value"
    assert set(composed) == set(cpu)


@pytest.mark.parametrize("group,registry", [("head", tuple(npc_head.HEADS)), ("model", MODEL_NAMES)])
def test_every_registered_name_has_a_config_and_every_config_is_registered(group, registry):
    names = {_raw(group, p.stem)["name"] for p in (CONF / group).glob("*.yaml")}
    assert names == set(registry)


@pytest.mark.parametrize("key,registry", [("head.name", npc_head.HEADS), ("model.name", MODEL_NAMES),
                                          ("optim.name", ("sgd", "adamw")), ("head.impl", ("auto", "reference", "chunked"))])
def test_the_validator_accepts_what_the_factories_build_and_names_them_when_it_refuses(key, registry):
    for name in registry:
        cfg = _compose()
        OmegaConf.update(cfg, key, name)
        validate_config(cfg)
    cfg = _compose()
    OmegaConf.update(cfg, key, "nonesuch")
    with pytest.raises(ConfigError, match=rf"{key} must be one of .*{list(registry)[0]}"):
        validate_config(cfg)


def test_the_factories_build_every_name_the_validator_accepts():
    """Names the validator takes are ones get_model, PartialFC and the optimizers build."""
    head = npc_head.ArcFace()
    for impl in ("auto", "reference", "chunked"):
        classifier = PartialFC(head, 4, 6, impl=impl)
        for name in ("sgd", "adamw"):
            build_classifier_optimizer(classifier, name=name)
    assert get_model("tiny", embedding_size=8) is not None


@pytest.mark.parametrize("member", sorted(p.stem for p in (CONF / "head").glob("*.yaml")))
def test_a_head_takes_every_constructor_argument_its_config_sets(member):
    cfg = _compose([f"head={member}"]).head
    cls = npc_head.HEADS[cfg.name]
    params = inspect.signature(cls).parameters
    assert builders.head_keys(cfg.name) == tuple(params)
    # every constructor argument is a key of the head's config (its default written there)
    assert set(params) <= set(cfg), f"conf/head/{member}.yaml lacks {set(params) - set(cfg)}"
    built = builders.build_head(cfg)
    assert type(built) is cls
