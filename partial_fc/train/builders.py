"""The one place where the Hydra config becomes objects; everything below takes plain arguments."""
from __future__ import annotations

from pathlib import Path
import torch
from omegaconf import DictConfig
from torch import nn

import npc_head

from ..optim import build_classifier_optimizer
from ..classifier import PartialFC
from .stop import StopRequest
from .trainer import TrainSettings, stop_request_for

HEAD_KEYS = {
    "npcface": ("s", "m0", "m1", "t", "alpha", "hard_margin"),
    "arcface": ("s", "m"),
    "cosface": ("s", "m"),
    "mvsoftmax": ("s", "m", "t", "arc", "fixed"),
    "curricularface": ("s", "m", "momentum"),
}
HEAD_CLASSES = {
    "npcface": npc_head.NPCFace, "arcface": npc_head.ArcFace, "cosface": npc_head.CosFace,
    "mvsoftmax": npc_head.MVSoftmax, "curricularface": npc_head.CurricularFace,
}


def build_head(head_cfg: DictConfig) -> nn.Module:
    name = head_cfg.name
    kwargs = {k: head_cfg[k] for k in HEAD_KEYS[name] if k in head_cfg}
    return HEAD_CLASSES[name](**kwargs)


# Model-specific keys passed on to get_model when the model group sets them (vit_*).
MODEL_EXTRA_KEYS = ("drop_path_rate", "mask_ratio")


def build_backbone(model_cfg: DictConfig) -> nn.Module:
    """The backbone; with ``model.pretrained`` (our backbone.pt, a checkpoint directory or an
    insightface state_dict) it starts from those weights, checked key by key."""
    from ..models import get_model, load_pretrained

    model = get_model(model_cfg.name, **backbone_kwargs(model_cfg))
    if model_cfg.get("pretrained"):
        load_pretrained(model, str(model_cfg.pretrained))
    return model


def backbone_kwargs(model_cfg: DictConfig) -> dict:
    kwargs = {
        "embedding_size": int(model_cfg.embedding_size),
        "dropout": float(model_cfg.dropout),
        "activation_checkpointing": bool(model_cfg.activation_checkpointing),
    }
    kwargs.update({k: float(model_cfg[k]) for k in MODEL_EXTRA_KEYS if k in model_cfg})
    return kwargs


GEMM_DTYPE_OF_PRECISION = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


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
        gemm_dtype=GEMM_DTYPE_OF_PRECISION[str(cfg.trainer.precision)] if on_cuda else None,
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
        dump_margins_every=int(t.get("dump_margins_every", 0) or 0),
        stop_file=Path(str(t.stop_file)).expanduser() if t.get("stop_file") else None,
        stop_poll_s=float(t.get("stop_poll_s", 5.0)),
        stop_signal=str(t.stop_signal) if t.get("stop_signal") else None,
        extra_manifest={"model": str(cfg.model.name), "head": str(cfg.head.name)},
    )


def build_stop_request(cfg: DictConfig, run_dir: Path) -> StopRequest:
    """The run's stop request: ``trainer.stop_file`` (default ``<run_dir>/STOP``), polled every
    ``trainer.stop_poll_s``, and ``trainer.stop_signal``."""
    return stop_request_for(build_settings(cfg, run_dir))
