"""Training: config validation, the Trainer, checkpoints, validation, logging, the run entry.

One module per concern: ``config`` (validation), ``builders`` (config -> objects), ``trainer``
(the loop), ``checkpoint`` (what is saved, re-sharded and loaded), ``validation``, ``rng``,
``process_group`` (DDP hook, timeouts), ``network`` (interfaces, the init check), ``preflight``
(the network measured before training), ``divergence``, ``stop``, ``data``, ``run`` (the entry).
"""
from .checkpoint import Checkpointer
from .config import ConfigError, validate_config
from .network import NetworkInterfaceError
from .run import run_training
from .trainer import Trainer, TrainSettings
from .validation import Validator

__all__ = ["ConfigError", "NetworkInterfaceError", "validate_config", "run_training", "Trainer", "TrainSettings",
           "Checkpointer", "Validator"]
