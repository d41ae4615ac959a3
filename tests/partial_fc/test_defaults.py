"""Defaults said once: ``PartialFC(head, D, C)`` with nothing chosen is what the training config
builds (conf/head/*.yaml through builders.py) and what bench/head.py measures."""
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import npc_head
import partial_fc
from partial_fc.train.builders import build_classifier

from tests.helpers.bench_scripts import load_bench_script

CONF = Path(__file__).resolve().parents[2] / "conf"
CLASSIFIER_KEYS = ("sample_rate", "impl", "block_size", "fused", "sweep")
SETTINGS = ("sample_rate", "impl", "block_size", "fused", "sweep", "gemm_dtype", "seed")


def _defaults():
    params = inspect.signature(partial_fc.PartialFC).parameters
    return {k: params[k].default for k in CLASSIFIER_KEYS}


@pytest.mark.parametrize("member", sorted(p.stem for p in (CONF / "head").glob("*.yaml")))
def test_every_head_config_sets_the_api_defaults_for_the_classifier(member):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"head={member}", "trainer.device=cpu"])
    assert {k: cfg.head[k] for k in CLASSIFIER_KEYS} == _defaults()
    built = build_classifier(cfg, num_classes=10)
    api = partial_fc.PartialFC(npc_head.HEADS[cfg.head.name](), 512, 10)
    assert {k: getattr(built, k) for k in SETTINGS} == {k: getattr(api, k) for k in SETTINGS}
    assert built.fused and built.sweep == "auto" and built.impl == "auto"


def test_the_head_bench_builds_the_api_default_unless_told_otherwise():
    bench = load_bench_script("head")
    assert bench.classifier_options(bench.parse_args([]), "fp32") == {"gemm_dtype": "float32"}
    told = bench.parse_args(["--no-fused", "--sweep", "classes"])
    assert bench.classifier_options(told, "bf16") == dict(fused=False, sweep="classes",
                                                          gemm_dtype="bfloat16")
