"""Samples per second of the training step as training runs it: ``Trainer.train_step()`` built
from the Hydra config by ``partial_fc.train.builders`` (backbone under the configured autocast,
the classifier outside it on fp32 embeddings and its configured path, both optimizers, the
gradient norm and the state check), fed one uint8 batch over and over as the data loader would
hand it over (pinned on CUDA, normalised on the device).

    python bench/train_step.py --model r50 --batch 256                       # CUDA: trainer=gpu
    python bench/train_step.py --model tiny --batch 32 --iters 3 trainer=cpu
    torchrun --nproc_per_node=8 bench/train_step.py --model r100 --batch 128 head.impl=chunked

Trailing arguments are Hydra overrides of ``conf/`` as ``launch/train.py`` takes them (the
default ``trainer=gpu`` when CUDA is available, else ``trainer=cpu``). Under torchrun every rank
times its steps and rank 0 prints one JSON line: ``ms`` (median step), ``samples_per_s`` of the
global batch (world size x ``--batch`` x ``trainer.grad_accum``), the classifier path of the last
step (``impl``), the peak device memory on CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partial_fc.data import DistributedShardSampler  # noqa: E402
from partial_fc.train import builders  # noqa: E402
from partial_fc.train.config import validate_config  # noqa: E402
from partial_fc.train.data import TRAIN_IMAGE_SIZE  # noqa: E402
from partial_fc.train.env import (configure_float32_math, detect_env, init_distributed,  # noqa: E402
                                  job_namespace, select_device)
from partial_fc.train.process_group import leave  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="r50", help="model=... (conf/model)")
    p.add_argument("--head", default="npcface", help="head=... (conf/head)")
    p.add_argument("--batch", type=int, default=256, help="data.batch_size: images per rank")
    p.add_argument("--classes", type=int, default=11_680,
                   help="classes per rank (default: MS1MV3's 93,431 over 8 GPUs)")
    p.add_argument("--warmup", type=int, default=None, help="default: 10 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default: 30 on CUDA, 2 on CPU")
    p.add_argument("--profile", action="store_true",
                   help="also count, in one more step, the operations of the trainer's bookkeeping "
                        "(gradient norm, clipping, state check) and the host syncs of the whole step")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.precision=fp16 head.fused=true")
    return p.parse_args(argv)


class RepeatedBatch:
    """The trainer's batch stream, serving one fixed batch: uint8 NxHxWx3 images (pinned for a
    CUDA device) and labels spread over the classes of every rank."""

    def __init__(self, batch_size: int, num_classes: int, pin: bool, rank: int, world_size: int):
        g = torch.Generator().manual_seed(rank)
        self.images = torch.randint(0, 256, (batch_size, *TRAIN_IMAGE_SIZE, 3), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=g)
        if pin:
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        self.batch_size = batch_size
        self.sampler = DistributedShardSampler(batch_size * world_size, world_size, rank)

    def next(self):
        return self.images, self.labels

    def advance(self, local_samples: int) -> None:
        pass

    def close(self) -> None:
        pass


def compose(args, cuda: bool):
    from hydra import compose as hydra_compose, initialize_config_dir

    overrides = [f"trainer={'gpu' if cuda else 'cpu'}", f"model={args.model}", f"head={args.head}",
                 f"data.batch_size={args.batch}", *args.overrides,
                 "trainer.progress_bar=false", "trainer.stop_signal=null", "data.val_bins=[]"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate_config(cfg)
    return cfg


def build(cfg, env, device, run_dir: Path, num_classes: int):
    """The Trainer of ``cfg`` on ``RepeatedBatch`` (``num_classes`` over all ranks)."""
    import torch.distributed as dist

    batches = RepeatedBatch(int(cfg.data.batch_size), num_classes, device.type == "cuda", env.rank, env.world_size)
    data = builders.PreparedData(run_dir, None, num_classes, [])
    group = dist.group.WORLD if env.distributed else None
    return builders.build_trainer(cfg, run_dir, data, device, group, env.rank, env.world_size, batches=batches)


def time_steps(trainer, warmup: int, iters: int, cuda: bool):
    """Median seconds of ``iters`` calls of ``trainer.train_step()`` after ``warmup`` more."""
    times = []
    for i in range(warmup + iters):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# The trainer's own bookkeeping phases (Trainer._phase ranges), whose operations must not grow
# with the model: the others run the model's forward, backward and optimizer update.
BOOKKEEPING = ("trainer/gradient norm", "trainer/state check")


def step_costs(trainer) -> dict:
    """One more step under torch.profiler: the aten operations the bookkeeping phases issue
    themselves (on CUDA each a kernel launch or a copy) and the step's device-to-host reads
    (``aten::_local_scalar_dense``; CUDA: every sync, from its sync debug mode)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught, profile(activities=[ProfilerActivity.CPU]) as prof:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    ops = 0
    for event in prof.events():
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if (event.name.startswith("aten::") and not any(a.startswith("aten::") for a in ancestors)
                and any(a in BOOKKEEPING for a in ancestors)):
            ops += 1
    costs = {"bookkeeping_ops": ops,
             "host_reads": sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense"),
             "parameter_tensors": sum(1 for _ in trainer.backbone.parameters()),
             "buffers": sum(1 for _ in trainer.backbone.buffers())}
    if cuda:
        costs["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    return costs


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not any(o in ("trainer=cpu", "trainer.device=cpu") for o in args.overrides)
    cfg = compose(args, cuda)
    env = detect_env()
    device = select_device(str(cfg.trainer.device), env)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    iters = args.iters if args.iters is not None else (30 if cuda else 2)
    init_distributed(env, device, float(cfg.trainer.collective_timeout_s), job_namespace(),
                     init_timeout_s=float(cfg.trainer.init_timeout_s))
    failed = True
    try:
        configure_float32_math(device, bool(cfg.trainer.deterministic))
        if cuda:
            torch.backends.cudnn.benchmark = not bool(cfg.trainer.deterministic)
        torch.manual_seed(int(cfg.trainer.seed))
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = build(cfg, env, device, Path(run_dir), args.classes * env.world_size)
            median = time_steps(trainer, warmup, iters, cuda)
            costs = step_costs(trainer) if args.profile else {}
        global_batch = int(cfg.data.batch_size) * env.world_size * int(cfg.trainer.grad_accum)
        record = {
            "bench": "train_step", "device": device.type, "model": str(cfg.model.name),
            "head": str(cfg.head.name), "batch": int(cfg.data.batch_size), "world_size": env.world_size,
            "global_batch": global_batch, "classes_per_rank": args.classes,
            "impl": trainer.classifier.last_impl, "fused": trainer.classifier.fused,
            "sample_rate": float(cfg.head.sample_rate), "precision": str(cfg.trainer.precision),
            "channels_last": bool(cfg.trainer.channels_last), "compile": bool(cfg.trainer.compile),
            "warmup": warmup, "iters": iters, "ms": round(median * 1e3, 3),
            "samples_per_s": round(global_batch / median, 1), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **costs,
        }
        if cuda:
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            record["gpu"] = torch.cuda.get_device_name(device)
        if env.rank == 0:
            print(json.dumps(record), flush=True)
        failed = False
    finally:
        leave(failed)


if __name__ == "__main__":
    main()
