"""Entry of a training run: validate, set up the job, measure the network (``trainer.preflight``),
build (``builders``), train, summarise."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from . import process_group
from .config import validate_config
from ..outputs import writing
from .env import (DistEnv, configure_float32_math, detect_env, init_distributed, job_namespace,
                  select_device)
from .preflight import preflight_mode

log = logging.getLogger("partial_fc.train")


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        force=True)


# Intra-op threads per rank by default, at most: past this the backbone's CPU-side work gains
# little, and a GPU node's cores are better left to the data workers.
MAX_DEFAULT_THREADS = 4


def _affinity_cores() -> int:
    """The cores this process may run on (its CPU affinity; all of them where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(threads, local_world_size: int, environ=None, cores=None) -> Optional[int]:
    """The intra-op threads a rank sets: ``trainer.threads`` when given; else None (keep what
    torch took) when ``OMP_NUM_THREADS`` is set; else ``min(MAX_DEFAULT_THREADS, cores of this
    process's CPU affinity (``cores``) // local ranks)``, at least 1."""
    environ = os.environ if environ is None else environ
    if threads is not None:
        return int(threads)
    if environ.get("OMP_NUM_THREADS"):
        return None
    cores = _affinity_cores() if cores is None else cores
    return max(1, min(MAX_DEFAULT_THREADS, int(cores) // max(1, local_world_size)))


def compile_workers(local_world_size: int, cores=None) -> int:
    """Inductor's compile workers per rank: the rank's share of the cores (inductor's own
    default is every core of the node, for each rank)."""
    cores = _affinity_cores() if cores is None else cores
    return max(1, int(cores) // max(1, local_world_size))


def _setup_threads(threads, local_world_size: int) -> None:
    count = default_threads(threads, local_world_size)
    if count is not None:
        torch.set_num_threads(count)
    # Read by torch._inductor.config when it is first imported, at the first compile (later).
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(compile_workers(local_world_size)))


def _setup_determinism(seed: int, deterministic: bool, rank: int, device: torch.device) -> None:
    from .rng import process_seed, seed_everything

    seed_everything(process_seed(seed, rank))
    configure_float32_math(device, deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def check_agreement(cfg: DictConfig, data, env: DistEnv, device: torch.device) -> None:
    """Every rank must run the same config (less :data:`agreement.PER_NODE_KEYS`), code and
    dataset on the same world size; raises :class:`agreement.RankDisagreementError` on all ranks."""
    from . import agreement

    if not env.distributed:
        return
    record = {**agreement.config_record(cfg), **agreement.code_record(),
              **agreement.dataset_record(data.dataset, data.num_classes), "launch.world_size": str(env.world_size)}
    agreement.check_ranks_agree(record, env.rank, env.world_size, device=device)


def run_preflight(cfg: DictConfig, run_dir: Path, num_classes: int, env: DistEnv, device: torch.device):
    """Collective: ``trainer.preflight`` unless ``off`` (:mod:`.preflight`); rank 0 logs the table
    and the warnings and writes ``run_dir/preflight.json``. Returns the report (None when off)."""
    from . import builders, process_group
    from .preflight import format_report

    if preflight_mode(cfg.trainer.preflight) == "off":
        return None
    group = dist.group.WORLD if env.distributed else None
    preflight = builders.build_preflight(cfg, num_classes, device, group, env.rank, env.world_size)
    timeout_s = float(cfg.trainer.collective_timeout_s)
    with process_group.named_timeouts(group, lambda err: process_group.timeout_error(
            err, group, env.rank, env.world_size, 0, "preflight (network measurements)", timeout_s)):
        report = preflight.run()
    if env.is_main:
        log.info("%s", format_report(report))
        for warning in report.warnings:
            log.warning("preflight: %s", warning)
        with writing(run_dir / "preflight.json", "the preflight report"):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "preflight.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report


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
        _setup_threads(cfg.trainer.threads, env.local_world_size)
        data = builders.prepare_data(cfg.data, is_local_main=env.local_rank == 0)
        log.info("dataset %s: %d images of %d identities (data.format=%s); %d verification set(s)",
                 data.root, len(data.dataset), data.num_classes, cfg.data.format, len(data.val_paths))

        init_distributed(env, device, float(cfg.trainer.collective_timeout_s), job_namespace(job_num=job_num),
                         init_timeout_s=float(cfg.trainer.init_timeout_s))
        failed = True
        try:
            check_agreement(cfg, data, env, device)  # before anything is written to run_dir
            report = run_preflight(cfg, run_dir, data.num_classes, env, device)
            if report is not None and preflight_mode(cfg.trainer.preflight) == "only":
                failed = False
                return {"preflight": report.to_dict(), "world_size": env.world_size, "launcher": env.launcher}
            _setup_determinism(int(cfg.trainer.seed), bool(cfg.trainer.deterministic), env.rank, device)
            if env.is_main:
                with writing(run_dir / "config.yaml", "the resolved config"):
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            group = dist.group.WORLD if env.distributed else None
            trainer = builders.build_trainer(cfg, run_dir, data, device, group, env.rank, env.world_size,
                                             stop_request)
            summary = trainer.fit()
            summary.update(world_size=env.world_size, launcher=env.launcher, device=str(device),
                           num_classes=data.num_classes, dataset=str(data.root))
            if env.is_main:
                with writing(run_dir / "summary.json", "the run summary"):
                    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            failed = False
            return summary
        finally:
            process_group.leave(failed)  # a rank failing alone aborts: it must not wait for peers
    finally:
        restore_signal()
