"""Entry of a training run: validate, set up the job, build, train, summarise."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .config import validate_config
from .env import DistEnv, detect_env, init_distributed, job_namespace, select_device

log = logging.getLogger("partial_fc.train")


@dataclass
class PreparedData:
    """The dataset as found on disk, checked against the config before any process group."""

    root: Path
    dataset: object
    num_classes: int
    val_paths: List[Path]


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        force=True)


def _setup_threads(cfg: DictConfig, local_world_size: int) -> None:
    threads = cfg.trainer.threads
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(int(threads))


def _setup_determinism(cfg: DictConfig, rank: int) -> None:
    from .rng import process_seed, seed_everything

    seed_everything(process_seed(int(cfg.trainer.seed), rank))
    if cfg.trainer.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def prepare_data(cfg: DictConfig, is_local_main: bool) -> PreparedData:
    """Find (or generate) the dataset, open it and check ``data.num_classes`` and ``val_bins``."""
    from .data import check_num_classes, dataset_root, open_dataset, resolve_val_bins

    root = dataset_root(cfg.data, is_local_main=is_local_main)
    dataset = open_dataset(cfg.data, root)
    return PreparedData(root, dataset, check_num_classes(cfg.data, dataset), resolve_val_bins(cfg.data, root))


def build_trainer(cfg: DictConfig, run_dir: Path, data: PreparedData, env: DistEnv,
                  device: torch.device, stop_request=None):
    """Every training object, built from the config (the process group must exist already)."""
    from ..data import DistributedShardSampler
    from ..eval.verification import load_verification_set
    from ..models import save_backbone
    from . import builders
    from .data import AugmentedFaces, BatchStream
    from .trainer import Trainer

    group = dist.group.WORLD if env.distributed else None
    sampler = DistributedShardSampler(len(data.dataset), env.world_size, env.rank, shuffle=True,
                                      seed=int(cfg.trainer.seed), drop_last=bool(cfg.data.drop_last))
    # Workers ship uint8 batches and the trainer normalises them on its device: a quarter of the
    # bytes through shared and pinned memory (bench/RESULTS.md, "Data loader").
    batches = BatchStream(AugmentedFaces(data.dataset, int(cfg.trainer.seed)), sampler,
                          int(cfg.data.batch_size), int(cfg.data.num_workers),
                          pin_memory=device.type == "cuda")
    backbone = builders.build_backbone(cfg.model).to(device)
    if cfg.trainer.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    classifier = builders.build_classifier(cfg, data.num_classes, group).to(device)
    opt_b, opt_c = builders.build_optimizers(cfg.optim, backbone, classifier)
    val_sets = [load_verification_set(p, progress=False) for p in data.val_paths]
    kwargs = builders.backbone_kwargs(cfg.model)

    def write_backbone(path):
        save_backbone(path, backbone, str(cfg.model.name), kwargs)

    trainer = Trainer(builders.build_settings(cfg, run_dir), backbone, classifier, opt_b, opt_c,
                      batches, device, val_sets=val_sets, save_backbone=write_backbone,
                      group=group, rank=env.rank, world_size=env.world_size, stop_request=stop_request)
    if cfg.trainer.compile:
        trainer.model = torch.compile(trainer.model)
    return trainer


def check_agreement(cfg: DictConfig, data: PreparedData, env: DistEnv, device: torch.device) -> None:
    """Every rank must run the same config (less :data:`agreement.PER_NODE_KEYS`), code and
    dataset on the same world size; raises :class:`agreement.RankDisagreementError` on all ranks."""
    from . import agreement

    if not env.distributed:
        return
    record = {**agreement.config_record(cfg), **agreement.code_record(),
              **agreement.dataset_record(data.dataset, data.num_classes), "launch.world_size": str(env.world_size)}
    agreement.check_ranks_agree(record, env.rank, env.world_size, device=device)


def run_training(cfg: DictConfig, run_dir: Path, job_num: int = 0) -> Dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the summary (also on disk).
    ``job_num``: the Hydra multirun job number (part of the rendezvous namespace)."""
    validate_config(cfg)  # before any process group, file or download
    env = detect_env()
    _setup_logging(env.rank)
    # From here on the stop signal is a stop request (acted on at the first step), not the end of
    # the process: a scheduler's warning may arrive while the data is prepared or the ranks meet.
    from . import builders

    stop_request = builders.build_stop_request(cfg, run_dir)
    restore_signal = stop_request.install()
    try:
        device = select_device(str(cfg.trainer.device), env)
        _setup_threads(cfg, env.local_world_size)
        data = prepare_data(cfg, is_local_main=env.local_rank == 0)

        init_distributed(env, device, float(cfg.trainer.collective_timeout_s), job_namespace(job_num=job_num),
                         init_timeout_s=float(cfg.trainer.init_timeout_s))
        try:
            check_agreement(cfg, data, env, device)  # before anything is written to run_dir
            _setup_determinism(cfg, env.rank)
            if env.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            trainer = build_trainer(cfg, run_dir, data, env, device, stop_request)
            summary = trainer.fit()
            summary.update(world_size=env.world_size, launcher=env.launcher, device=str(device),
                           num_classes=data.num_classes, dataset=str(data.root))
            if env.is_main:
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            return summary
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        restore_signal()
