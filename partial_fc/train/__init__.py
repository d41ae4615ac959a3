"""Training: config validation, the Trainer, checkpoints, logging, the run entry."""
from .config import ConfigError, validate_config
from .run import run_training
from .trainer import Trainer, TrainSettings

__all__ = ["ConfigError", "validate_config", "run_training", "Trainer", "TrainSettings"]
