"""Checkpoint files: atomic layout, latest pointer, pruning, row re-sharding across world sizes."""
import json

import pytest
import torch

from partial_fc import shard_range
from partial_fc.train import checkpoint as ckpt


def _write(root, step, world, C, D=3, keep=5):
    """Write a checkpoint as `world` ranks would, one after another (no process group)."""
    full_w = torch.arange(C * D, dtype=torch.float32).reshape(C, D) + step
    full_m = -full_w
    for rank in range(world):
        start, count = shard_range(C, world, rank)
        final = root / ckpt.step_dir_name(step)
        tmp = root / (ckpt.step_dir_name(step) + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        shard = {"rows": {"weight": full_w[start:start + count],
                          "optimizer_state": {0: {"momentum_buffer": full_m[start:start + count],
                                                  "step": torch.tensor(7.0)}}},
                 "optimizer_groups": [{"lr": 0.1, "params": [0]}], "rng": {"torch": torch.get_rng_state()}}
        ckpt.atomic_torch_save(shard, tmp / f"shard_{rank:05d}.pt")
    # rank 0's part of the protocol
    ckpt.atomic_torch_save({"step": step}, tmp / "trainer.pt")
    ckpt.atomic_write_text(tmp / ckpt.MANIFEST, json.dumps({"num_classes": C, "world_size": world, "step": step}))
    tmp.rename(final)
    ckpt.atomic_write_text(root / ckpt.LATEST, final.name)
    return full_w, full_m


@pytest.mark.parametrize("old,new", [(2, 3), (3, 1), (1, 4), (4, 4), (3, 5)])
def test_rows_and_optimizer_state_reshard_exactly(tmp_path, old, new):
    C = 11
    full_w, full_m = _write(tmp_path, 5, old, C)
    path = ckpt.find_latest(tmp_path)
    pieces_w = []
    for rank in range(new):
        state, same = ckpt.load_shard_rows(path, C, new, rank)
        assert same == (old == new)
        start, count = shard_range(C, new, rank)
        assert torch.equal(state["rows"]["weight"], full_w[start:start + count])
        opt = state["rows"]["optimizer_state"][0]
        assert torch.equal(opt["momentum_buffer"], full_m[start:start + count])
        assert float(opt["step"]) == 7.0
        assert state["optimizer_groups"][0]["lr"] == 0.1
        pieces_w.append(state["rows"]["weight"])
    assert torch.equal(torch.cat(pieces_w), full_w)


def test_num_classes_mismatch_raises(tmp_path):
    _write(tmp_path, 1, 2, 10)
    with pytest.raises(ValueError, match="num_classes"):
        ckpt.load_shard_rows(ckpt.find_latest(tmp_path), 12, 2, 0)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    _write(tmp_path, 10, 2, 6)
    # a crash while writing step 20: the .tmp dir exists, latest still names step 10
    (tmp_path / "step_00000020.tmp").mkdir()
    assert ckpt.find_latest(tmp_path).name == "step_00000010"
    # a renamed dir without a manifest is not complete either
    (tmp_path / "step_00000030").mkdir()
    assert ckpt.find_latest(tmp_path).name == "step_00000010"
    # a stale latest pointer falls back to the newest complete checkpoint
    ckpt.atomic_write_text(tmp_path / ckpt.LATEST, "step_00000030")
    assert ckpt.find_latest(tmp_path).name == "step_00000010"


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "auto") is None
    assert ckpt.resolve_resume(tmp_path, "none") is None
    _write(tmp_path, 3, 1, 4)
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step_00000003"
    assert ckpt.resolve_resume(tmp_path, str(tmp_path / "step_00000003")).name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nowhere"))


def test_writer_keeps_newest_n(tmp_path):
    for step in (1, 2, 3, 4):
        writer = ckpt.CheckpointWriter(tmp_path, 0, 1, keep=2)
        writer.save(step, {"step": step}, {"rows": {"weight": torch.zeros(2, 2)}}, {"num_classes": 2})
    names = [p.name for p in ckpt.complete_checkpoints(tmp_path)]
    assert names == ["step_00000003", "step_00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    assert ckpt.load(tmp_path / "step_00000004" / "trainer.pt") == {"step": 4}


def test_files_load_with_weights_only(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path, 0, 1, keep=1)
    path = writer.save(1, {"a": torch.ones(1)}, {"rows": {"weight": torch.ones(1, 1)}}, {"num_classes": 1})
    with open(path / "evil.pt", "wb") as f:
        torch.save({"fn": print}, f)  # pickles a reference to a callable
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        ckpt.load(path / "evil.pt")
