"""The paper-comparison preset composes with every head; the new heads build from their configs."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import npc_head
from partial_fc.train import builders
from partial_fc.train.config import ConfigError, validate_config

CONF = Path(__file__).resolve().parents[2] / "conf"
HEADS = {"npcface": npc_head.NPCFace, "arcface": npc_head.ArcFace, "cosface": npc_head.CosFace,
         "mvsoftmax": npc_head.MVSoftmax, "curricularface": npc_head.CurricularFace}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_preset_with_each_head(head):
    cfg = _compose(["experiment=paper_compare", f"head={head}", "trainer.seed=2"])
    assert cfg.hydra.sweep.subdir == f"{head}-seed2"
    assert cfg.run_name == f"paper_compare-{head}-seed2"
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    built = builders.build_head(cfg.head)
    assert type(built) is HEADS[head]
    assert built.scale == 32.0, "one scale for every head in the comparison"
    assert (cfg.model.name, cfg.trainer.max_steps, cfg.trainer.dump_margins_every) == ("tiny", 300, 50)


def test_new_head_hyper_parameters_reach_the_heads():
    cfg = _compose(["head=mvsoftmax", "head.t=1.3", "head.arc=false", "head.fixed=true"])
    mv = builders.build_head(cfg.head)
    assert (mv.m, mv.t, mv.arc, mv.fixed) == (0.35, 1.3, False, True)
    cfg = _compose(["head=curricularface", "head.momentum=0.05"])
    cur = builders.build_head(cfg.head)
    assert (cur.scale, cur.m, cur.momentum) == (64.0, 0.5, 0.05)


def test_negative_dump_interval_names_the_key():
    cfg = _compose(["trainer.dump_margins_every=-1"])
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    with pytest.raises(ConfigError, match=r"trainer\.dump_margins_every"):
        validate_config(cfg)
