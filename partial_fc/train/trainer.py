"""The training loop: a Trainer with small named methods and plain-argument settings."""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data.transforms import normalize_batch
from ..distributed import all_gather_rows
from . import checkpoint as ckpt
from .metrics_log import MetricLogger
from .schedule import lr_factor
from .stop import StopRequest

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Everything the loop needs, as plain values (built from the config in one place)."""

    run_dir: Path
    max_steps: int
    stop_at: Optional[int] = None
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_accum: int = 1
    clip_grad_norm: Optional[float] = None
    log_every: int = 10
    val_every: int = 0
    val_batch_size: int = 128
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: str = "auto"
    seed: int = 0
    warmup_steps: int = 0
    poly_power: float = 2.0
    min_lr_factor: float = 0.0
    channels_last: bool = False
    progress_bar: bool = True  # on a terminal; elsewhere a log line per log_every steps
    collective_timeout_s: Optional[float] = None  # only named in errors; the process group enforces it
    # A run whose loss or gradient is non-finite this many steps in a row can no longer learn and
    # ends with TrainingDivergedError (fp16's loss scaler skips a few steps early on: the bound
    # leaves room for them). 0: no bound.
    max_consecutive_skips: int = 25
    dump_margins_every: int = 0  # >0: rank 0 writes the classifier's per-sample stats (see dump_margins)
    # A request to checkpoint and stop (partial_fc.train.stop): when this file exists for any rank,
    # or a rank receives stop_signal, every rank ends the step it is in, writes a checkpoint and
    # returns (the run continues with resume=auto). stop_file None: <run_dir>/STOP, looked for at
    # most every stop_poll_s seconds; stop_signal None: no handler.
    stop_file: Optional[Path] = None
    stop_poll_s: float = 5.0
    stop_signal: Optional[str] = "SIGUSR1"
    extra_manifest: Dict = field(default_factory=dict)


def stop_request_for(settings: TrainSettings) -> StopRequest:
    """The stop request the settings describe (``stop_file`` defaulting to ``<run_dir>/STOP``)."""
    return StopRequest(settings.stop_file or Path(settings.run_dir) / "STOP", settings.stop_poll_s,
                       settings.stop_signal)


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete in time: a peer hung or died."""


class TrainingDivergedError(RuntimeError):
    """The run cannot learn any more: its model state holds NaN/inf, or too many consecutive
    steps had a non-finite loss or gradient. No checkpoint is written after it."""


def first_nonfinite(named_tensors) -> Optional[str]:
    """Name and summary of the first floating-point tensor of ``(name, tensor)`` pairs that holds
    NaN or inf, or None. One device-to-host copy (of the flags) however many tensors there are."""
    named = [(n, t) for n, t in named_tensors if t.is_floating_point() and t.numel()]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    if bool(flags.all()):
        return None
    name, tensor = named[int((~flags).nonzero()[0])]
    bad = ~torch.isfinite(tensor.detach())
    return (f"{name} (shape {tuple(tensor.shape)}: {int(bad.sum())} of {tensor.numel()} values "
            f"non-finite, {int(torch.isnan(tensor).sum())} NaN)")


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


class SumGradients:
    """DDP communication hook that all-reduces the backbone's gradient as a *sum*.

    Every rank back-propagates the same global-batch loss through its own samples only, so the
    true gradient is the sum over ranks, not DDP's default mean.
    """

    @staticmethod
    def hook(group, bucket):
        work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


def rng_state() -> Dict:
    """This process's RNG states as tensors and numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(py_words, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(int(w) for w in state["python"]),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains ``backbone`` + sharded ``classifier`` on ``batches``.

    Args:
        backbone: images -> embeddings (not yet DDP-wrapped; the trainer wraps it).
        classifier: a :class:`partial_fc.PartialFC` on this rank's classes.
        backbone_optimizer / classifier_optimizer: their optimizers; every param group's
            ``initial_lr`` is the base LR the schedule scales.
        batches: a :class:`partial_fc.train.data.BatchStream` (``next()``, ``advance(n)``,
            ``sampler``) of float32 Nx3xHxW images, or of uint8 NxHxWx3 images that the trainer
            normalises on ``device``.
        val_sets: decoded verification sets (``partial_fc.eval.verification.VerificationSet``).
        save_backbone: writes the bare backbone to a path (for ``backbone.pt``).
    """

    def __init__(self, settings: TrainSettings, backbone: nn.Module, classifier: nn.Module,
                 backbone_optimizer, classifier_optimizer, batches, device: torch.device,
                 val_sets: Sequence = (), save_backbone: Optional[Callable] = None,
                 group=None, rank: int = 0, world_size: int = 1,
                 stop_request: Optional[StopRequest] = None):
        self.s = settings
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.group = group if world_size > 1 else None
        self.backbone = backbone
        self.model = self._wrap_ddp(backbone)
        self.classifier = classifier
        self.optimizers = [backbone_optimizer, classifier_optimizer]
        for opt in self.optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.batches = batches
        self.val_sets = list(val_sets)
        self.save_backbone = save_backbone
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.history: Dict[str, List] = {"val": []}
        self.samples_per_sec = 0.0
        self.writer = ckpt.CheckpointWriter(
            settings.run_dir / "checkpoints", rank, world_size, settings.keep_checkpoints, self.group
        )
        self.logger: Optional[MetricLogger] = None
        self.phase = "start-up"  # what the loop is doing, named in collective-timeout errors
        self.stop = stop_request or stop_request_for(settings)
        self.stop_requested = False  # agreed by all ranks at the end of each step
        self.stopped_by_request = False

    # ------------------------------------------------------------------ set-up
    def _wrap_ddp(self, backbone: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return backbone
        kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
        # Each rank keeps its own BatchNorm statistics between steps (as insightface does).
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
        ddp = nn.parallel.DistributedDataParallel(backbone, process_group=self.group, **kwargs)
        ddp.register_comm_hook(self.group, SumGradients.hook)
        return ddp

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.s.precision)

    # ------------------------------------------------------------------ state
    def state(self) -> Dict:
        """What rank 0 saves besides the classifier shards."""
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "backbone": self.backbone.state_dict(),
            "backbone_optimizer": self.optimizers[0].state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.batches.sampler.state_dict(),
            "history": json.dumps(self.history),
        }

    def shard_state(self) -> Dict:
        """What every rank saves: its classifier rows, their optimizer state, its RNG."""
        opt_state = self.optimizers[1].state_dict()
        return {
            "rows": {"weight": self.classifier.weight.detach().cpu(),
                     "optimizer_state": opt_state["state"]},
            "optimizer_groups": opt_state["param_groups"],
            "classifier_buffers": {k: v.cpu() for k, v in self.classifier.named_buffers()
                                   if not k.startswith("head.")},
            "head_buffers": {k: v.cpu() for k, v in self.classifier.head.named_buffers()},
            "rng": rng_state(),
            "rank": self.rank,
        }

    def sync_buffers(self) -> None:
        """Give every rank rank 0's backbone buffers (BatchNorm running statistics).

        Ranks keep their own statistics while training (no per-step broadcast); before evaluating
        or saving, all ranks take rank 0's, so validation scores exactly the saved backbone.
        """
        if self.group is None:
            return
        for buffer in self.backbone.buffers():
            dist.broadcast(buffer, src=dist.get_global_rank(self.group, 0), group=self.group)

    def save_checkpoint(self) -> Path:
        self.phase = "checkpoint (barriers around the shard writes)"
        self.sync_buffers()
        self.check_state_finite()  # never write a checkpoint that cannot be resumed from
        manifest = {"num_classes": self.classifier.num_classes, **self.s.extra_manifest}
        path = self.writer.save(self.step, self.state() if self.rank == 0 else {},
                                self.shard_state(), manifest, self.save_backbone if self.rank == 0 else None)
        if self.rank == 0:
            log.info("checkpoint written: %s", path)
        return path

    def load_checkpoint(self, path: Path, main_from_rank0: bool = False) -> None:
        """Restore from ``path``; ``main_from_rank0``: the trainer state comes from rank 0 (nodes
        that do not share a filesystem have only their own shards)."""
        if main_from_rank0:
            main = ckpt.broadcast_main_state(ckpt.load(path / "trainer.pt") if self.rank == 0 else None,
                                             self.group)
        else:
            main = ckpt.load(path / "trainer.pt")
        ckpt.load_into(self.backbone, main["backbone"], path / "trainer.pt", "backbone")
        self.optimizers[0].load_state_dict(main["backbone_optimizer"])
        self.scaler.load_state_dict(main["scaler"])
        self.batches.sampler.load_state_dict(main["sampler"])
        self.step = int(main["step"])
        self.skipped_steps = int(main["skipped_steps"])
        self.history = json.loads(main["history"])
        shard, same_layout = ckpt.load_shard_rows(path, self.classifier.num_classes,
                                                  self.world_size, self.rank)
        rows = shard["rows"]["weight"]
        if rows.shape != self.classifier.weight.shape:
            raise ckpt.CheckpointError(
                f"{path}: classifier rows of rank {self.rank} are {tuple(rows.shape)} (classes x "
                f"embedding), this run has {tuple(self.classifier.weight.shape)}; model.embedding_size "
                "must match the checkpoint's")
        with torch.no_grad():
            self.classifier.weight.copy_(rows)
        opt = self.optimizers[1]
        groups = opt.state_dict()["param_groups"]
        for mine, saved in zip(groups, shard["optimizer_groups"]):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        opt.load_state_dict({"state": shard["rows"]["optimizer_state"], "param_groups": groups})
        for name, value in shard["classifier_buffers"].items():
            self.classifier.get_buffer(name).copy_(value)
        for name, value in shard["head_buffers"].items():
            self.classifier.head.get_buffer(name).copy_(value)
        if same_layout:
            set_rng_state(shard["rng"])
        else:  # new ranks have no RNG history: derive it from (seed, rank, step)
            seed_everything(self.s.seed * 100003 + self.rank * 7919 + self.step)
        log.info("resumed from %s at step %d (%s layout)", path, self.step,
                 "same" if same_layout else f"re-sharded to {self.world_size} ranks")

    def _named_state(self):
        """(name, tensor) of every parameter and buffer this rank holds (BatchNorm statistics
        and the classifier shard included)."""
        for prefix, module in (("backbone", self.backbone), ("classifier", self.classifier)):
            for name, tensor in module.named_parameters():
                yield f"{prefix} parameter {name}", tensor
            for name, tensor in module.named_buffers():
                yield f"{prefix} buffer {name}", tensor

    def check_state_finite(self) -> None:
        """Raise TrainingDivergedError on every rank when any rank's model state holds NaN/inf;
        the message names the first such tensor (on the rank that holds it) and the step."""
        found = first_nonfinite(self._named_state())
        if self.group is not None:
            flag = torch.tensor([float(found is not None)], device=self.device)
            dist.all_reduce(flag, group=self.group)
            if found is None and float(flag) > 0:
                found = "a tensor of another rank (its log names it)"
        if found is not None:
            raise TrainingDivergedError(
                f"rank {self.rank}: after step {self.step} the model state is non-finite: {found}. The run "
                f"has diverged and stops without writing a checkpoint; the newest checkpoint in "
                f"{self.writer.root} is the last good one. Lower optim.lr or set trainer.clip_grad_norm, "
                "then resume"
            )

    # ------------------------------------------------------------------ the step
    def _set_lr(self) -> float:
        factor = lr_factor(self.step, self.s.max_steps, self.s.warmup_steps, self.s.poly_power,
                           self.s.min_lr_factor)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
        return self.optimizers[0].param_groups[0]["lr"]

    def _forward_backward(self, images, labels, scale: float, sync: bool) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        memory_format = torch.channels_last if self.s.channels_last else torch.contiguous_format
        if images.dtype == torch.uint8:  # NxHxWx3 from workers that left normalising to us
            images = normalize_batch(images, memory_format=memory_format)
        elif self.s.channels_last:
            images = images.contiguous(memory_format=memory_format)
        no_sync = getattr(self.model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with context:
            self.phase = "backbone forward"
            with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                embeddings = self.model(images)
            self.phase = ("classifier forward (all-gather of embeddings/labels, all-reduce of target "
                          "cosines, margin statistics and softmax normalisers)")
            loss = self.classifier(embeddings, labels)
            self.phase = "backward (reduce-scatter of embedding gradients, DDP all-reduce)"
            self.scaler.scale(loss * scale).backward()
        return loss.detach()

    def _grad_norm(self, stop_vote: bool = False):
        """(global L2 norm of all gradients, whether any rank votes to stop).

        Backbone grads are already summed over ranks; the classifier's squared norm is summed by
        an all-reduce, which also carries the stop votes, so every rank learns at the same step
        that one of them saw the stop file, without a collective of its own."""
        def sq(params):
            grads = [p.grad.detach().float() for p in params if p.grad is not None]
            if not grads:
                return torch.zeros((), device=self.device)
            return torch.stack([g.pow(2).sum() for g in grads]).sum()

        classifier_sq = sq(self.classifier.parameters())
        # new_full fills on the device: a host-to-device copy of the vote would sync every step
        local = torch.stack([classifier_sq, classifier_sq.new_full((), float(stop_vote))])
        if self.group is not None:
            dist.all_reduce(local, group=self.group)
        return (sq(self.backbone.parameters()) + local[0]).sqrt(), local[1]

    def train_step(self) -> Dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its record."""
        lr = self._set_lr()
        losses = []
        for micro in range(self.s.grad_accum):
            self.phase = "data loading"
            images, labels = self.batches.next()
            last = micro == self.s.grad_accum - 1
            losses.append(self._forward_backward(images, labels, 1.0 / self.s.grad_accum, sync=last))
            self.batches.advance(self.batches.batch_size)  # sampler positions, skipped samples included
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        loss = torch.stack(losses).mean()
        self.phase = "gradient-norm all-reduce"
        grad_norm, stop_votes = self._grad_norm(self.stop.vote())
        self.phase = "optimizer step"
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        self.stop_requested = bool(stop_votes > 0)
        if finite:
            if self.s.clip_grad_norm is not None and float(grad_norm) > self.s.clip_grad_norm:
                coef = self.s.clip_grad_norm / (float(grad_norm) + 1e-6)
                for module in (self.backbone, self.classifier):
                    for p in module.parameters():
                        if p.grad is not None:
                            p.grad.mul_(coef)
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
            self.consecutive_skips = 0
        else:  # same decision on every rank: the loss and the norm are global
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); skipped",
                        self.step, float(loss), float(grad_norm))
            if self.scaler.is_enabled():
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        bound = self.s.max_consecutive_skips
        if bound and self.consecutive_skips >= bound:
            raise TrainingDivergedError(
                f"steps {self.step - bound + 1}..{self.step}: {bound} consecutive steps had a non-finite "
                f"loss or gradient (last loss={float(loss)}, grad_norm={float(grad_norm)}); the run can no "
                f"longer learn (trainer.max_consecutive_skips={bound}). Lower optim.lr or set "
                f"trainer.clip_grad_norm, then resume from the newest checkpoint in {self.writer.root}"
            )
        self.phase = "check of the model state (all-reduce of a non-finite flag)"
        self.check_state_finite()
        record = {"loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
                  "skipped_steps": self.skipped_steps}
        if self.scaler.is_enabled():
            record["amp_scale"] = float(self.scaler.get_scale())
        return record

    def classifier_record(self) -> Dict[str, float]:
        """The head's per-step diagnostics of the last step (NPCFace margins, CurricularFace t).

        Computed only when a record is logged: each value is a device-to-host copy."""
        record = {}
        stats = self.classifier.last_stats
        if "margin" in stats:
            record["npc/margin_mean"] = float(stats["margin"].mean())
            record["npc/margin_std"] = float(stats["margin"].std()) if stats["margin"].numel() > 1 else 0.0
            record["npc/hard_negatives_mean"] = float(stats["hard_count"].mean())
        if "t" in stats and stats["t"].numel():  # CurricularFace's running t
            record["head/t"] = float(stats["t"][0])
        return record

    def dump_margins(self) -> Optional[Path]:
        """Write the last step's per-sample classifier statistics (``target_cos`` and, for
        NPCFace, ``margin`` / ``hard_count``; the same global batch on every rank) to
        ``run_dir/margins/step_XXXXXXX.npz``; rank 0 only. Returns the path written."""
        stats = self.classifier.last_stats
        if self.rank != 0 or not stats:
            return None
        folder = self.s.run_dir / "margins"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:07d}.npz"
        arrays = {k: v.detach().cpu().double().numpy() for k, v in stats.items() if v.dim() == 1}
        np.savez(path, step=np.int64(self.step), **arrays)
        return path

    # ------------------------------------------------------------------ validation
    def validate(self) -> Dict[str, float]:
        """Flip-fused 1:1 verification on every set; each rank embeds a slice of the images,
        so no rank idles on a collective while another evaluates."""
        from ..eval.embedding import embed_images
        from ..eval.verification import evaluate_pairs

        results = {}
        self.phase = "validation (all-gather of embeddings)"
        self.sync_buffers()
        for vset in self.val_sets:
            n = vset.images.shape[0]
            lo = n * self.rank // self.world_size
            hi = n * (self.rank + 1) // self.world_size
            emb, _ = embed_images(self.backbone, vset.images[lo:hi], batch_size=self.s.val_batch_size,
                                  device=self.device, autocast_dtype=self.autocast_dtype)
            emb = torch.from_numpy(emb).to(self.device)
            if self.group is not None:
                emb = all_gather_rows(emb, group=self.group)
            metrics = evaluate_pairs(emb.cpu().numpy(), vset.issame)
            if "failed" in metrics:  # training goes on; the state check says whether it can
                results[f"val/{vset.name}/nonfinite"] = float(metrics["num_nonfinite"])
                if self.rank == 0:
                    log.warning("step %d: validation on %s failed: %s", self.step, vset.name, metrics["failed"])
                continue
            results[f"val/{vset.name}/acc"] = float(metrics["acc"])
            results[f"val/{vset.name}/std"] = float(metrics["std"])
            for far, tar in metrics.get("tar_at_far", {}).items():
                if tar is not None and far in ("1e-03", "1e-04", "0.001", "0.0001"):
                    results[f"val/{vset.name}/tar@far={far}"] = float(tar)
        if results:
            self.history["val"].append({"step": self.step, **results})
        return results

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Dict:
        """Train to ``max_steps`` (or ``stop_at``); returns a summary."""
        self.phase = "resume (ranks compare the checkpoints they find)"
        with self._named_timeouts():
            path, main_from_rank0 = ckpt.agree_on_resume(self.s.run_dir / "checkpoints", self.s.resume,
                                                         self.classifier.num_classes, self.rank,
                                                         self.world_size, self.group)
            if path is not None:
                self.load_checkpoint(path, main_from_rank0)
        self.stop.discard_stale(path)
        end = self.s.stop_at if self.s.stop_at is not None else self.s.max_steps
        self.logger = MetricLogger(self.s.run_dir, enabled=self.rank == 0, resume_step=self.step)
        bar = None
        # A bar on a terminal; into a file (slurm-*.out, a pipe) a log line per log interval.
        if self.rank == 0 and self.s.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True)
        restore_signal = self.stop.install()  # a no-op when run_training installed it already
        try:
            with self._named_timeouts():
                self._loop(end, bar)
        finally:
            restore_signal()
            if bar is not None:
                bar.close()
            self.logger.close()
            self.batches.close()
        return self.summary()

    def _timeout_error(self, err: BaseException) -> CollectiveTimeoutError:
        """Name the operation, this rank and, where gloo can tell, the ranks that did not answer."""
        missing = ""
        try:  # gloo only: reports which ranks fail to reach the barrier
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=10), wait_all_ranks=True)
        except Exception as probe:  # noqa: BLE001 - any failure here is informative only
            missing = f"; barrier probe: {str(probe).splitlines()[0][:300]}"
        limit = f" within {self.s.collective_timeout_s:g}s" if self.s.collective_timeout_s else ""
        return CollectiveTimeoutError(
            f"rank {self.rank}/{self.world_size} at step {self.step}: a collective in '{self.phase}' did "
            f"not complete{limit} (a peer hung or died; trainer.collective_timeout_s sets the limit)"
            f"{missing}. Original error: {str(err).splitlines()[0][:500]}"
        )

    @contextlib.contextmanager
    def _named_timeouts(self):
        """A collective timing out inside becomes a :class:`CollectiveTimeoutError` naming ``phase``."""
        try:
            yield
        except Exception as err:
            if self.group is not None and _is_timeout(err):
                raise self._timeout_error(err) from err
            raise

    def _loop(self, end: int, bar) -> None:
        """Validation at step 0, then steps with logging, validation and checkpoints."""
        if self.step == 0 and self.val_sets:
            self._log(self.validate())
        window_start, window_steps = time.perf_counter(), 0
        while self.step < end:
            record = self.train_step()
            window_steps += 1
            every = self.s.dump_margins_every
            if every and (self.step == 1 or self.step % every == 0 or self.step == end):
                self.dump_margins()
            if self.step % self.s.log_every == 0 or self.step == end:
                elapsed = time.perf_counter() - window_start
                global_samples = window_steps * self.batches.batch_size * self.world_size * self.s.grad_accum
                self.samples_per_sec = global_samples / max(elapsed, 1e-9)
                record["samples_per_sec"] = self.samples_per_sec
                record.update(self.classifier_record())
                self._log(record)
                if "margin" in self.classifier.last_stats:
                    self.logger.histogram(self.step, "npc/margin", self.classifier.last_stats["margin"])
                window_start, window_steps = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{self.samples_per_sec:.0f}")
                elif self.rank == 0:
                    log.info("step %d/%d: loss %.4f, %.0f samples/s", self.step, end, record["loss"],
                             self.samples_per_sec)
            if bar is not None:
                bar.update(1)
            at_end = self.step == end
            paused = time.perf_counter()
            if self.val_sets and (at_end or (self.s.val_every and self.step % self.s.val_every == 0)):
                self._log(self.validate())
            if at_end or self.step % self.s.checkpoint_every == 0 or self.stop_requested:
                self.save_checkpoint()
            window_start += time.perf_counter() - paused  # samples/s counts training only
            if self.stop_requested:  # the checkpoint of this step is written
                self.stop.acknowledge(self.step, unfinished=not at_end)
                if not at_end:
                    self.stopped_by_request = True
                    if self.rank == 0:
                        log.info("stop requested (%s or %s): checkpoint of step %d written; stopping. "
                                 "Run again with trainer.resume=auto to continue", self.stop.path,
                                 self.stop.signal_name, self.step)
                    return

    def _log(self, record: Dict[str, float]) -> None:
        if record:
            self.logger.log(self.step, record)
            if self.rank == 0 and any(k.startswith("val/") for k in record):
                log.info("step %d: %s", self.step,
                         ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith("/acc")))

    def summary(self) -> Dict:
        vals = self.history.get("val", [])
        return {
            "steps": self.step,
            "stopped_by_request": self.stopped_by_request,
            "skipped_steps": self.skipped_steps,
            "samples_per_sec": self.samples_per_sec,
            "val_first": vals[0] if vals else None,
            "val_last": vals[-1] if vals else None,
            "run_dir": str(self.s.run_dir),
            "checkpoints": str(self.s.run_dir / "checkpoints"),
            "tensorboard": str(self.s.run_dir / "tensorboard"),
            "metrics": str(self.s.run_dir / "metrics.jsonl"),
        }
