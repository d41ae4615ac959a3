"""NPCFace on a model-parallel Partial FC classifier."""
from . import optim
from .classifier import PartialFC
from .sharding import shard_range
from .softmax import distributed_cross_entropy

__all__ = ["PartialFC", "shard_range", "distributed_cross_entropy", "optim"]
