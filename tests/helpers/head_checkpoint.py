"""A head's running state through the trainer's real checkpoint: train, save, resume in a fresh
trainer, train on; against a run that never stopped. Run on gloo ranks (dist_harness)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

import npc_head

# Heads with running state, their buffers moving visibly within a few steps.
STATEFUL_HEADS = {
    "curricularface": lambda: npc_head.CurricularFace(s=16.0, m=0.5),
    "adaface": lambda: npc_head.AdaFace(s=16.0, m=0.4, h=0.333, t_alpha=0.5),
}


def _buffers(trainer):
    return {k: v.clone() for k, v in trainer.classifier.head.named_buffers()}


def resume_worker(rank, world_size, root, head_name):
    """On one rank: a straight run of 3 steps; a run stopped after 2 steps with a checkpoint,
    resumed by a fresh trainer for its third. Returns the head's buffers at each point (saved
    in the shard file, after two steps, fresh, restored, after the resumed step, after the
    straight run), both third-step losses and the resumed step's logged record."""
    from tests.helpers.trainer_fixtures import make_trainer, step_record

    group = dist.group.WORLD if world_size > 1 else None

    def trainer(name):
        return make_trainer(Path(root) / name, rank, world_size, batch_size=6, group=group,
                            head=STATEFUL_HEADS[head_name]())

    straight = trainer("straight")
    straight_losses = [step_record(straight)["loss"] for _ in range(3)]
    first = trainer("stopped")
    for _ in range(2):
        first.train_step()
    path = first.save_checkpoint()
    saved = torch.load(path / f"shard_{rank:05d}.pt", weights_only=True)["head_buffers"]
    resumed = trainer("stopped")
    fresh = _buffers(resumed)
    resumed.load_checkpoint(path)
    restored = _buffers(resumed)
    record = {**step_record(resumed), **resumed.classifier_record()}
    return dict(saved=saved, after_two=_buffers(first), fresh=fresh, restored=restored,
                resumed=_buffers(resumed), straight=_buffers(straight), record=record,
                resumed_loss=record["loss"], straight_loss=straight_losses[2])
