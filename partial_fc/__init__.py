"""NPCFace on a model-parallel Partial FC classifier."""
from . import optim
from .classifier import PartialFC, distributed_cross_entropy, shard_range

__all__ = ["PartialFC", "shard_range", "distributed_cross_entropy", "optim"]
