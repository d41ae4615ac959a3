"""trainer.progress_bar: a tqdm bar on a terminal only; into a file (slurm-*.out, a pipe) a log
line per log interval instead of carriage-return bar updates."""
import dataclasses
import logging
import sys

import pytest

from tests.helpers.trainer_fixtures import make_trainer


def _fit(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.settings = dataclasses.replace(trainer.settings, progress_bar=True, log_every=2)
    with caplog.at_level(logging.INFO, logger="partial_fc.train.trainer"):
        trainer.fit()
    return [r.getMessage() for r in caplog.records if ": loss " in r.getMessage()]


def test_off_a_terminal_a_log_line_per_interval_and_no_bar(tmp_path, caplog, capsys):
    assert not sys.stderr.isatty()  # pytest captures it
    lines = _fit(tmp_path, caplog)
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(" samples/s" in line for line in lines)
    err = capsys.readouterr().err
    assert "\r" not in err and "train:" not in err


def test_on_a_terminal_the_bar_and_no_log_lines(tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert _fit(tmp_path, caplog) == []
    err = capsys.readouterr().err
    assert "train:" in err and "4/4" in err
