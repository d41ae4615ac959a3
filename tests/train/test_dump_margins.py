"""trainer.dump_margins_every: per-sample classifier statistics written during training."""
import numpy as np
import torch

import npc_head

from tests.helpers.trainer_fixtures import make_trainer


def test_snapshots_at_step_one_every_n_and_the_end(tmp_path):
    trainer = make_trainer(tmp_path, batch_size=8, max_steps=5, dump_margins_every=2)
    trainer.fit()
    files = sorted(p.name for p in (tmp_path / "margins").glob("*.npz"))
    assert files == [f"step_{s:07d}.npz" for s in (1, 2, 4, 5)]
    with np.load(tmp_path / "margins" / "step_0000005.npz") as last:
        assert int(last["step"]) == 5
        stats = trainer.classifier.last_stats
        for key in ("margin", "hard_count", "target_cos"):
            np.testing.assert_array_equal(last[key], stats[key].double().numpy())
        # NPCFace's margin really is m0 + m1 * (mean hard negative cosine): within its range.
        head = trainer.classifier.head
        assert np.all(last["margin"] >= head.m0 - head.m1) and np.all(last["margin"] <= head.m0 + head.m1)
        assert last["target_cos"].shape == (8,)


def test_off_by_default_and_other_heads_dump_what_they_have(tmp_path):
    trainer = make_trainer(tmp_path / "off", batch_size=8, max_steps=2)
    trainer.fit()
    assert not (tmp_path / "off" / "margins").exists()
    trainer = make_trainer(tmp_path / "arc", batch_size=8, max_steps=2, dump_margins_every=1,
                           head=npc_head.ArcFace(s=16.0))
    trainer.fit()
    with np.load(tmp_path / "arc" / "margins" / "step_0000002.npz") as last:
        assert set(last.files) == {"step", "target_cos"}
        np.testing.assert_array_equal(last["target_cos"],
                                      trainer.classifier.last_stats["target_cos"].double().numpy())
    assert torch.is_tensor(trainer.classifier.last_stats["target_cos"])
