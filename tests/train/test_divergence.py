"""A run that diverges ends non-zero with a message naming the tensor and the step, never writes a
checkpoint with non-finite state, and validation of a diverged model reports, not crashes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from partial_fc.eval.verification import VerificationSet
from partial_fc.train import checkpoint as ckpt
from partial_fc.train.divergence import TrainingDivergedError

from tests.helpers.dist_harness import run_workers
from tests.helpers.trainer_fixtures import DIM, SIDE, make_trainer


def bn_backbone(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, DIM))


class NaNForSteps(nn.Module):
    """A linear backbone whose output is NaN for its first ``bad`` training forwards (as a loss
    scaler's overflow or a bad batch would make it), finite after."""

    def __init__(self, bad):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, DIM))
        self.bad = bad
        self.calls = 0

    def forward(self, x):
        out = self.body(x)
        if self.training:
            self.calls += 1
            if self.calls <= self.bad:
                return out * float("nan")
        return out


def _all_finite(path):
    main = ckpt.load(path / "trainer.pt")
    tensors = [t for t in main["backbone"].values() if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_diverged_state_stops_the_run_and_the_last_good_checkpoint_stays_newest(tmp_path):
    trainer = make_trainer(tmp_path, backbone=bn_backbone(), max_steps=12)
    trainer.settings.checkpoint_every = 1
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = 1e6  # optim.lr=1e6
    with pytest.raises(TrainingDivergedError, match=r"rank 0: after step (\d+) the model state is non-finite: "
                                                    r"backbone (parameter|buffer) [\w.]+ \(shape") as err:
        trainer.fit()
    step = int(err.value.args[0].split("after step ")[1].split()[0])
    assert step < 12
    saved = ckpt.complete_checkpoints(tmp_path / "checkpoints")
    assert saved, "the steps before divergence were checkpointed"
    newest = ckpt.resolve_resume(tmp_path / "checkpoints", "auto")
    assert newest.name == ckpt.step_dir_name(step - 1) and all(_all_finite(p) for p in saved)
    assert f"the last good checkpoint is {newest}" in str(err.value)


def test_consecutive_skips_end_a_run_that_cannot_learn_but_early_skips_are_tolerated(tmp_path):
    trainer = make_trainer(tmp_path / "dead", backbone=NaNForSteps(bad=10**6), max_steps=12,
                           max_consecutive_skips=4)
    with pytest.raises(TrainingDivergedError, match=r"steps 1\.\.4: 4 consecutive steps had a non-finite loss.*"
                                                    r"trainer\.max_consecutive_skips=4") as err:
        trainer.fit()
    assert trainer.step == 4 and not (tmp_path / "dead" / "checkpoints").exists()
    assert "no checkpoint has been written yet" in str(err.value)
    recovers = make_trainer(tmp_path / "ok", backbone=NaNForSteps(bad=3), max_steps=8, max_consecutive_skips=4)
    summary = recovers.fit()
    assert summary["steps"] == 8 and summary["skipped_steps"] == 3


def test_validation_of_nonfinite_embeddings_reports_the_set_and_goes_on(tmp_path, caplog):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(20, 3, SIDE, SIDE), dtype=np.uint8))
    vset = VerificationSet("tiny_pairs", images, np.arange(10) % 2 == 0)
    trainer = make_trainer(tmp_path, backbone=NaNForSteps(bad=0), max_steps=2)
    with torch.no_grad():
        trainer.backbone.body[1].bias.fill_(float("nan"))
    trainer.val_sets = [vset]
    with caplog.at_level("WARNING"):
        results = trainer.validate()
    assert results == {"val/tiny_pairs/nonfinite": 20.0}
    assert any("step 0: validation on tiny_pairs failed: 20 of 20 embeddings are non-finite" in r.message
               for r in caplog.records)


def _nan_shard_worker(rank, world_size, run_dir):
    trainer = make_trainer(run_dir, rank, world_size, batch_size=4, group=dist.group.WORLD)
    trainer.train_step()
    if rank == 1:
        with torch.no_grad():
            trainer.classifier.weight[0, 0] = float("inf")
    try:
        trainer.save_checkpoint()
    except TrainingDivergedError as err:
        return str(err)
    return "saved"


def test_every_rank_stops_when_one_rank_holds_nonfinite_state(tmp_path):
    results = run_workers(_nan_shard_worker, 2, str(tmp_path), timeout=120)
    assert "another rank" in results[0] and results[0].startswith("rank 0: after step 1")
    assert results[1].startswith("rank 1: after step 1 the model state is non-finite: classifier parameter weight "
                                 "(shape (6, 16): 1 of 96 values non-finite, 0 NaN)")
    assert not ckpt.complete_checkpoints(tmp_path / "checkpoints")


def test_a_finished_run_started_again_says_there_is_nothing_to_train(tmp_path, caplog):
    make_trainer(tmp_path, max_steps=2).fit()
    again = make_trainer(tmp_path, max_steps=2)
    with caplog.at_level("INFO", logger="partial_fc.train.trainer"):
        summary = again.fit()
    assert summary["steps"] == 2
    assert "the run is already at step 2 of 2" in caplog.text and "nothing to train" in caplog.text


def test_histograms_keep_finite_values_and_skip_all_nan(tmp_path):
    """A skipped step's NaN margins are left out of the TensorBoard histogram (TensorBoard raises
    on a histogram of NaNs) and the finite ones are written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from partial_fc.train.metrics_log import MetricLogger

    logger = MetricLogger(tmp_path, enabled=True)
    logger.histogram(1, "npc/margin", torch.full((8,), float("nan")))
    logger.histogram(2, "npc/margin", torch.tensor([0.4, float("nan"), 0.5, float("inf")]))
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    written = events.Histograms("npc/margin")
    assert [h.step for h in written] == [2]
    assert written[0].histogram_value.num == 2
    assert abs(written[0].histogram_value.sum - 0.9) < 1e-6
