"""The one place where the Hydra config becomes objects; everything below takes plain arguments."""
from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import npc_head

from ..optim import build_classifier_optimizer
from ..classifier import PartialFC
from .config import ConfigError
from .stop import StopRequest
from .trainer import AUTOCAST_DTYPES, Trainer, TrainSettings, stop_request_for


def head_keys(name: str) -> tuple:
    """The ``head.*`` config keys head ``name`` takes: its constructor's arguments."""
    return tuple(inspect.signature(npc_head.HEADS[name]).parameters)


def build_head(head_cfg: DictConfig) -> nn.Module:
    """The margin head ``head.name`` (:data:`npc_head.HEADS`) with the ``head.*`` keys its
    constructor takes (the others configure the classifier)."""
    name = head_cfg.name
    kwargs = {k: head_cfg[k] for k in head_keys(name) if k in head_cfg}
    return npc_head.HEADS[name](**kwargs)


# Model-specific keys passed on to get_model when the model group sets them (vit_*).
MODEL_EXTRA_KEYS = ("drop_path_rate", "mask_ratio")


def build_backbone(model_cfg: DictConfig) -> nn.Module:
    """The backbone; with ``model.pretrained`` (our backbone.pt, a checkpoint directory or an
    insightface state_dict) it starts from those weights, checked key by key."""
    from ..models import get_model, load_pretrained

    model = get_model(model_cfg.name, **backbone_kwargs(model_cfg))
    if model_cfg.pretrained:
        try:
            load_pretrained(model, str(model_cfg.pretrained))
        except (ValueError, OSError) as err:  # the file's refusal, named by its key
            raise ConfigError(f"model.pretrained: {err}") from None
    return model


def backbone_kwargs(model_cfg: DictConfig) -> dict:
    kwargs = {
        "embedding_size": int(model_cfg.embedding_size),
        "dropout": float(model_cfg.dropout),
        "activation_checkpointing": bool(model_cfg.activation_checkpointing),
    }
    kwargs.update({k: float(model_cfg[k]) for k in MODEL_EXTRA_KEYS if k in model_cfg})
    return kwargs


def gemm_dtype_of(precision: str):
    """The classifier's GEMM input dtype name for ``trainer.precision`` (None: float32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return None if dtype is None else str(dtype).replace("torch.", "")


def build_classifier(cfg: DictConfig, num_classes: int, group=None) -> PartialFC:
    """The sharded classifier; its GEMMs follow ``trainer.precision`` on CUDA (fp32 statistics
    always)."""
    on_cuda = str(cfg.trainer.device) in ("cuda", "auto") and torch.cuda.is_available()
    return PartialFC(
        build_head(cfg.head),
        embedding_size=int(cfg.model.embedding_size),
        num_classes=num_classes,
        sample_rate=float(cfg.head.sample_rate),
        process_group=group,
        seed=int(cfg.trainer.seed),
        impl=str(cfg.head.impl),
        block_size=None if cfg.head.block_size is None else int(cfg.head.block_size),
        fused=bool(cfg.head.fused),
        sweep=str(cfg.head.sweep),
        gemm_dtype=gemm_dtype_of(str(cfg.trainer.precision)) if on_cuda else None,
    )


def build_optimizers(optim_cfg: DictConfig, backbone: nn.Module, classifier: PartialFC):
    """(backbone optimizer, classifier optimizer). The classifier has its own row-sparse optimizer
    (same rule and hyper-parameters, LR ``lr * classifier_lr_scale``): with Partial FC sampling
    only the scored rows are updated, their momentum and weight decay included."""
    lr = float(optim_cfg.lr)
    wd = float(optim_cfg.weight_decay)
    if optim_cfg.name == "sgd":
        rule = dict(momentum=float(optim_cfg.momentum), nesterov=bool(optim_cfg.nesterov))
        backbone_opt = torch.optim.SGD(backbone.parameters(), lr=lr, weight_decay=wd, **rule)
    else:
        rule = dict(betas=tuple(optim_cfg.betas), eps=float(optim_cfg.eps))
        backbone_opt = torch.optim.AdamW(backbone.parameters(), lr=lr, weight_decay=wd, **rule)
    classifier_opt = build_classifier_optimizer(
        classifier, name=str(optim_cfg.name), lr=lr * float(optim_cfg.classifier_lr_scale),
        weight_decay=wd, **rule)
    return backbone_opt, classifier_opt


def build_settings(cfg: DictConfig, run_dir: Path) -> TrainSettings:
    """The loop's settings from ``trainer.*`` and the schedule's ``optim.*`` keys."""
    t, o = cfg.trainer, cfg.optim
    return TrainSettings(
        run_dir=run_dir,
        max_steps=int(t.max_steps),
        stop_at=None if t.stop_at is None else int(t.stop_at),
        precision=str(t.precision),
        grad_accum=int(t.grad_accum),
        clip_grad_norm=None if t.clip_grad_norm is None else float(t.clip_grad_norm),
        max_consecutive_skips=int(t.max_consecutive_skips),
        log_every=int(t.log_every),
        val_every=int(t.val_every),
        val_batch_size=int(t.val_batch_size),
        checkpoint_every=int(t.checkpoint_every),
        keep_checkpoints=int(t.keep_checkpoints),
        resume=str(t.resume),
        seed=int(t.seed),
        warmup_steps=int(o.warmup_steps),
        poly_power=float(o.poly_power),
        min_lr_factor=float(o.min_lr) / float(o.lr),
        channels_last=bool(t.channels_last),
        progress_bar=bool(t.progress_bar),
        collective_timeout_s=float(t.collective_timeout_s),
        dump_margins_every=int(t.dump_margins_every or 0),  # null: off
        stop_file=Path(str(t.stop_file)).expanduser() if t.stop_file else None,
        stop_poll_s=float(t.stop_poll_s),
        stop_signal=str(t.stop_signal) if t.stop_signal else None,
        extra_manifest={"model": str(cfg.model.name), "head": str(cfg.head.name)},
    )


def build_preflight(cfg: DictConfig, num_classes: int, device: torch.device, group=None, rank: int = 0,
                    world_size: int = 1):
    """The run's :class:`.preflight.Preflight`: the backbone of ``model.*`` (random weights), the
    step's collectives for ``data.batch_size``, the classifier as ``head.*`` configures it and
    ``trainer.grad_accum`` on ``world_size`` ranks, the budget and thresholds of
    ``trainer.preflight_*``."""
    from ..classifier.plan import plan_step, scored_bound
    from ..classifier.tiles import compiler_unavailable_reason
    from ..classifier.traffic import step_collectives as classifier_collectives
    from ..models import get_model
    from .preflight import Preflight, step_collectives

    t, h, batch = cfg.trainer, cfg.head, int(cfg.data.batch_size)
    rows = batch * world_size
    compiled = bool(h.fused) and compiler_unavailable_reason(device) is None
    plan = plan_step(str(h.impl), str(h.sweep), rows,
                     scored_bound(num_classes, world_size, float(h.sample_rate), rows, True), device.type,
                     compiled, None if h.block_size is None else int(h.block_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # The trainer hands the classifier fp32 embeddings, whatever the backbone's autocast dtype.
    classifier = classifier_collectives(plan, [batch] * world_size, int(cfg.model.embedding_size),
                                        build_head(h).num_stats, torch.float32, backend=backend)

    return Preflight(
        build_backbone=lambda: get_model(str(cfg.model.name), **backbone_kwargs(cfg.model)).to(device),
        collectives=lambda gradient_bytes: step_collectives(classifier, gradient_bytes, int(t.grad_accum)),
        local_batch=batch, grad_accum=int(t.grad_accum),
        autocast_dtype=AUTOCAST_DTYPES[str(t.precision)], channels_last=bool(t.channels_last), device=device,
        group=group, rank=rank, world_size=world_size, budget_s=float(t.preflight_budget_s),
        slow_link=float(t.preflight_slow_link), max_comm_share=float(t.preflight_max_comm_share))


def build_stop_request(cfg: DictConfig, run_dir: Path) -> StopRequest:
    """The run's stop request: ``trainer.stop_file`` (default ``<run_dir>/STOP``), polled every
    ``trainer.stop_poll_s``, and ``trainer.stop_signal``."""
    return stop_request_for(build_settings(cfg, run_dir))


@dataclass
class PreparedData:
    """The dataset as found on disk, checked against the config before any process group."""

    root: Path
    dataset: object
    num_classes: int
    val_paths: List[Path]


def prepare_data(data_cfg: DictConfig, is_local_main: bool) -> PreparedData:
    """Find (or generate) the dataset ``data.*`` describes, open it and check
    ``data.num_classes`` and ``data.val_bins``."""
    from .data import ensure_synthetic, existing_root, open_dataset, resolve_val_bins

    fmt = str(data_cfg.format)
    if fmt == "synthetic":
        params = OmegaConf.to_container(data_cfg.synthetic, resolve=True)
        root = ensure_synthetic(str(data_cfg.cache_dir), params, is_local_main)
    else:
        root = existing_root(data_cfg.root)
    label_check = str(data_cfg.label_check) if fmt != "folder" else None
    num_classes = None if data_cfg.num_classes is None else int(data_cfg.num_classes)
    dataset = open_dataset(fmt, root, str(data_cfg.on_bad_image), label_check, num_classes)
    return PreparedData(root, dataset, int(dataset.num_classes), resolve_val_bins(data_cfg.val_bins, root))


def build_trainer(cfg: DictConfig, run_dir: Path, data: PreparedData, device: torch.device, group=None,
                  rank: int = 0, world_size: int = 1, stop_request=None, batches=None) -> Trainer:
    """Every training object, built from the config; ``group``: the process group of the run
    (it must exist already; None: one process). ``batches``: a stream to train on instead of
    ``data.dataset``'s (``bench/train_step.py`` feeds one batch over and over)."""
    from ..data import DistributedShardSampler
    from ..eval.metrics import FOLDS  # what the validator scores with
    from ..eval.verification import load_verification_set
    from ..models import save_backbone
    from .data import AugmentedFaces, BatchStream

    seed = int(cfg.trainer.seed)
    if batches is None:
        sampler = DistributedShardSampler(len(data.dataset), world_size, rank, shuffle=True,
                                          seed=seed, drop_last=bool(cfg.data.drop_last))
        per_epoch = DistributedShardSampler(len(data.dataset), world_size, rank, shuffle=False,
                                            drop_last=bool(cfg.data.drop_last))
        if len(per_epoch) < int(cfg.data.batch_size):  # said now, on every rank, not at the first step
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than a rank's share of the data "
                              f"set ({len(data.dataset)} images over {world_size} rank(s): {len(per_epoch)} per epoch)")
        # Workers ship uint8 batches and the trainer normalises them on its device: a quarter of
        # the bytes through shared and pinned memory (bench/RESULTS.md, "Data loader").
        batches = BatchStream(AugmentedFaces(data.dataset, seed), sampler, int(cfg.data.batch_size),
                              int(cfg.data.num_workers), pin_memory=device.type == "cuda")
    backbone = build_backbone(cfg.model).to(device)
    if cfg.trainer.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    classifier = build_classifier(cfg, data.num_classes, group).to(device)
    backbone_optimizer, classifier_optimizer = build_optimizers(cfg.optim, backbone, classifier)
    try:
        val_sets = [load_verification_set(p, progress=False, folds=FOLDS) for p in data.val_paths]
    except (ValueError, OSError, pickle.UnpicklingError) as err:  # the file's refusal, named by its key
        raise ConfigError(f"data.val_bins: {err}") from None
    model_name, kwargs = str(cfg.model.name), backbone_kwargs(cfg.model)

    def write_backbone(path):
        save_backbone(path, backbone, model_name, kwargs)

    trainer = Trainer(build_settings(cfg, run_dir), backbone, classifier, backbone_optimizer,
                      classifier_optimizer, batches, device, val_sets=val_sets, save_backbone=write_backbone,
                      group=group, rank=rank, world_size=world_size, stop_request=stop_request)
    if cfg.trainer.compile:
        trainer.model = torch.compile(trainer.model)
    return trainer
