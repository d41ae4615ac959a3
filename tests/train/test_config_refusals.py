"""Config values that used to pass validation and fail late (after the ranks met) or be taken
for something else: each is refused by validate_config, naming the key and what it expected."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from partial_fc.train.config import ConfigError, validate_config
from tests.helpers.e2e import REPO

CONF_DIR = REPO / "conf"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["head.m0=abc"], "head.m0 must be a number, got 'abc'"),
    (["head.t=abc"], "head.t must be a number, got 'abc'"),
    (["head.t=0.5"], "head.t must be >= 1, got 0.5"),
    (["head.m0=4.0"], "head.m0 must be in [0, pi), got 4.0"),
    (["head.hard_margin=abc"], "head.hard_margin must be a number or null, got 'abc'"),
    (["head=arcface", "head.m=abc"], "head.m must be a number, got 'abc'"),
    (["head=mvsoftmax", "head.arc=3"], "head.arc must be true or false, got 3"),
    (["trainer.resume=yes"], "trainer.resume must be auto, none or an existing checkpoint directory"),
])
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_cfg(*overrides))
    assert message in str(err.value)


def test_good_values_pass(tmp_path):
    validate_config(_cfg("head.hard_margin=0.5", "head.m0=0.3"))
    validate_config(_cfg("head=arcface", "head.m=0.5"))
    validate_config(_cfg(f"trainer.resume={tmp_path}"))
