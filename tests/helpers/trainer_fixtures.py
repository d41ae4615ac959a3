"""Small in-memory pieces to drive the real Trainer in tests."""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import npc_head
import partial_fc
from partial_fc.data import DistributedShardSampler
from partial_fc.optim import build_classifier_optimizer
from partial_fc.train.builders import build_settings
from partial_fc.train.data import AugmentedFaces, BatchStream
from partial_fc.train.trainer import Trainer, TrainSettings

NUM_CLASSES, DIM, SIDE = 13, 16, 8
CONF = Path(__file__).resolve().parents[2] / "conf"


@functools.lru_cache(maxsize=None)
def default_settings() -> TrainSettings:
    """The settings of the default config (conf/trainer/cpu.yaml, conf/optim/sgd.yaml): the one
    place their defaults are written."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.stop_file=null"])
    return dataclasses.replace(build_settings(cfg, Path(".")), extra_manifest={})


class MemoryFaces(torch.utils.data.Dataset):
    """Deterministic random uint8 images with labels."""

    def __init__(self, n=96, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, SIDE, SIDE, 3), dtype=np.uint8)
        self.labels = rng.integers(0, NUM_CLASSES, size=n)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def linear_backbone(seed=0):
    """No BatchNorm, so per-rank and whole-batch statistics cannot differ."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 32), nn.Tanh(), nn.Linear(32, DIM))


def full_classifier_weight(seed=1):
    return torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(seed))


def make_trainer(run_dir: Path, rank=0, world_size=1, batch_size=8, grad_accum=1, backbone=None,
                 head=None, max_steps=10, group=None, normalize_in_workers=False, stop_request=None,
                 device="cpu", classifier_kwargs=None, **settings):
    device = torch.device(device)
    backbone = (backbone or linear_backbone()).to(device)
    classifier = partial_fc.PartialFC(head or npc_head.NPCFace(s=16.0), DIM, NUM_CLASSES,
                                      process_group=group, **(classifier_kwargs or {})).to(device)
    with torch.no_grad():
        start, count = partial_fc.shard_range(NUM_CLASSES, world_size, rank)
        classifier.weight.copy_(full_classifier_weight()[start:start + count])
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_c = build_classifier_optimizer(classifier, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    data = MemoryFaces()
    sampler = DistributedShardSampler(len(data), world_size, rank, shuffle=True, seed=3)
    batches = BatchStream(AugmentedFaces(data, seed=3, normalize=normalize_in_workers), sampler, batch_size,
                          num_workers=0, pin_memory=device.type == "cuda")
    s = dataclasses.replace(default_settings(), run_dir=Path(run_dir), max_steps=max_steps,
                            grad_accum=grad_accum, progress_bar=False, log_every=1, checkpoint_every=1000,
                            **settings)
    return Trainer(s, backbone, classifier, opt_b, opt_c, batches, device,
                   group=group, rank=rank, world_size=world_size, stop_request=stop_request)


def parameters_of(trainer):
    return {"backbone": [p.detach().clone() for p in trainer.backbone.parameters()],
            "classifier": trainer.classifier.weight.detach().clone()}


def step_record(trainer) -> dict:
    """One training step's record with its values read as floats (what the loop logs)."""
    return trainer.read_record(trainer.train_step())
