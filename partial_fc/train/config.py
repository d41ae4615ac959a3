"""Validation of the composed training config, before any process group or file exists.

Errors name the offending key (``head.sample_rate``), so a wrong command line fails in a second
instead of after minutes of cluster start-up.
"""
from __future__ import annotations

import inspect
import math
import signal
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import npc_head

from ..data.datasets import LABEL_CHECKS
from ..models.factory import MODEL_NAMES as MODELS
from ..optim import OPTIMIZERS
from ..classifier import IMPLS, SWEEPS
from .data import FORMATS
from .preflight import MODES as PREFLIGHT_MODES, preflight_mode
from .trainer import PRECISIONS

# Every name list comes from the registry that builds the objects.
HEADS = tuple(npc_head.HEADS)


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the key."""


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # MissingMandatoryValue, interpolation errors
        raise ConfigError(f"{key}: {err}") from None


def _require(cfg, key, check, message):
    value = _get(cfg, key)
    ok = False
    try:
        ok = bool(check(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{key} {message}, got {value!r}")
    return value


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid key of a composed training config."""
    for group in ("data", "model", "head", "optim", "trainer"):
        if _get(cfg, group) is None:
            raise ConfigError(f"{group}: config group missing")

    fmt = _require(cfg, "data.format", lambda v: v in FORMATS, f"must be one of {FORMATS}")
    if fmt != "synthetic":
        _require(cfg, "data.root", lambda v: isinstance(v, str) and v, "must name the dataset folder")
    _require(cfg, "data.batch_size", _positive_int, "must be a positive integer")
    _require(cfg, "data.num_workers", _non_negative_int, "must be an integer >= 0")
    _require(cfg, "data.on_bad_image", lambda v: v in ("raise", "skip"), "must be raise or skip")
    if fmt != "folder":
        _require(cfg, "data.label_check", lambda v: v in LABEL_CHECKS, f"must be one of {LABEL_CHECKS}")
    num_classes = _get(cfg, "data.num_classes")
    if num_classes is not None and not _positive_int(num_classes):
        raise ConfigError(f"data.num_classes must be a positive integer or null, got {num_classes!r}")
    if fmt == "synthetic":
        for key in ("num_identities", "images_per_identity", "family_size"):
            _require(cfg, f"data.synthetic.{key}", _positive_int, "must be a positive integer")

    _require(cfg, "model.name", lambda v: v in MODELS, f"must be one of {MODELS}")
    _require(cfg, "model.embedding_size", _positive_int, "must be a positive integer")
    _require(cfg, "model.dropout", lambda v: _number(v) and 0 <= v < 1, "must be in [0, 1)")
    for key in ("model.drop_path_rate", "model.mask_ratio"):  # vit_* only
        if _get(cfg, key) is not None:
            _require(cfg, key, lambda v: _number(v) and 0 <= v < 1, "must be in [0, 1)")
    pretrained = _get(cfg, "model.pretrained")
    if pretrained is not None and not (isinstance(pretrained, str) and Path(pretrained).exists()):
        raise ConfigError(f"model.pretrained must name an existing backbone file or checkpoint "
                          f"directory (ours or insightface's state_dict) or be null, "
                          f"got {pretrained!r}")

    head = _require(cfg, "head.name", lambda v: v in HEADS, f"must be one of {HEADS}")
    _require(cfg, "head.s", lambda v: _number(v) and v > 0, "must be > 0")
    _check_head_arguments(cfg, head)
    _require(cfg, "head.sample_rate", lambda v: _number(v) and 0 < v <= 1, "must be in (0, 1]")
    _require(cfg, "head.impl", lambda v: v in IMPLS, f"must be one of {IMPLS}")
    block = _get(cfg, "head.block_size")
    if block is not None and not _positive_int(block):
        raise ConfigError(f"head.block_size must be a positive integer or null, got {block!r}")
    _require(cfg, "head.fused", lambda v: isinstance(v, bool), "must be true or false")
    _require(cfg, "head.sweep", lambda v: v in SWEEPS, f"must be one of {SWEEPS}")

    _require(cfg, "optim.name", lambda v: v in OPTIMIZERS, f"must be one of {OPTIMIZERS}")
    _require(cfg, "optim.lr", lambda v: _number(v) and v > 0, "must be > 0")
    _require(cfg, "optim.weight_decay", lambda v: _number(v) and v >= 0, "must be >= 0")
    _require(cfg, "optim.warmup_steps", _non_negative_int, "must be an integer >= 0")
    _require(cfg, "optim.classifier_lr_scale", lambda v: _number(v) and v > 0, "must be > 0")

    _require(cfg, "trainer.device", lambda v: v in ("cpu", "cuda", "auto"), "must be cpu, cuda or auto")
    _require(cfg, "trainer.precision", lambda v: v in PRECISIONS, f"must be one of {PRECISIONS}")
    max_steps = _require(cfg, "trainer.max_steps", _positive_int, "must be a positive integer")
    stop_at = _get(cfg, "trainer.stop_at")
    if stop_at is not None and not (_positive_int(stop_at) and stop_at <= max_steps):
        raise ConfigError(f"trainer.stop_at must be in [1, trainer.max_steps={max_steps}] or null, got {stop_at!r}")
    _require(cfg, "trainer.grad_accum", _positive_int, "must be a positive integer")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _require(cfg, f"trainer.{key}", _positive_int, "must be a positive integer")
    _require(cfg, "trainer.val_every", _non_negative_int, "must be an integer >= 0")
    _require(cfg, "trainer.max_consecutive_skips", _non_negative_int, "must be an integer >= 0 (0: no bound)")
    dump = _get(cfg, "trainer.dump_margins_every")
    if dump is not None and not _non_negative_int(dump):
        raise ConfigError(f"trainer.dump_margins_every must be an integer >= 0, got {dump!r}")
    _require(cfg, "trainer.collective_timeout_s", lambda v: _number(v) and v > 0, "must be > 0")
    _require(cfg, "trainer.init_timeout_s", lambda v: _number(v) and v > 0, "must be > 0")
    _require(cfg, "trainer.stop_poll_s", lambda v: _number(v) and v >= 0, "must be a number >= 0")
    _check_preflight(cfg)
    stop_signal = _get(cfg, "trainer.stop_signal")
    catchable = sorted(s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP))
    if stop_signal is not None and stop_signal not in catchable:
        raise ConfigError(f"trainer.stop_signal must be null or a signal name such as SIGUSR1, "
                          f"got {stop_signal!r}")
    clip = _get(cfg, "trainer.clip_grad_norm")
    if clip is not None and not (_number(clip) and clip > 0):
        raise ConfigError(f"trainer.clip_grad_norm must be > 0 or null, got {clip!r}")
    resume = _get(cfg, "trainer.resume")
    if not isinstance(resume, str) or not resume:
        raise ConfigError(f"trainer.resume must be auto, none or a checkpoint path, got {resume!r}")
    if resume not in ("auto", "none") and not Path(resume).expanduser().is_dir():
        raise ConfigError(f"trainer.resume must be auto, none or an existing checkpoint directory "
                          f"(.../checkpoints/step_XXXXXXXX), got {resume!r}: "
                          f"{Path(resume).expanduser().absolute()} is not a directory")


def _check_head_arguments(cfg: DictConfig, name: str) -> None:
    """Each ``head.*`` argument of head ``name``'s constructor has the type of its default (a
    number, or true/false; null where the default is None), and the head's own range checks
    run now, so ``head.m0=abc`` fails here naming the key instead of after the ranks meet."""
    head_class = npc_head.HEADS[name]
    kwargs = {}
    for key, param in inspect.signature(head_class).parameters.items():
        value = _get(cfg, f"head.{key}")
        if value is None and param.default is not None:
            continue  # not set: the constructor's default applies
        if isinstance(param.default, bool):
            ok, wanted = isinstance(value, bool), "true or false"
        else:
            ok = _number(value) or (value is None and param.default is None)
            wanted = "a number" + (" or null" if param.default is None else "")
        if not ok:
            raise ConfigError(f"head.{key} must be {wanted}, got {value!r}")
        kwargs[key] = value
    try:
        head_class(**kwargs)
    except ValueError as err:  # the head's message starts with the argument's name
        raise ConfigError(f"head.{err}" if str(err).split(" ")[0] in kwargs else f"head ({name}): {err}") from None


def _check_preflight(cfg: DictConfig) -> None:
    """``trainer.preflight`` and its budget and warning thresholds."""
    _require(cfg, "trainer.preflight", preflight_mode, f"must be one of {PREFLIGHT_MODES}")
    _require(cfg, "trainer.preflight_budget_s", lambda v: _number(v) and v > 0, "must be > 0 (seconds)")
    _require(cfg, "trainer.preflight_slow_link", lambda v: _number(v) and 0 <= v <= 1, "must be in [0, 1]")
    _require(cfg, "trainer.preflight_max_comm_share", lambda v: _number(v) and 0 < v <= 1, "must be in (0, 1]")
