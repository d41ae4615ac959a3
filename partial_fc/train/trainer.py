"""The training loop: a Trainer that reads as the algorithm (build, fit, step, log, checkpoint).

What it leans on lives apart: the checkpoint schema in :mod:`.checkpoint` (a
:class:`~.checkpoint.Checkpointer` given the objects to save), validation in :mod:`.validation`,
the RNG in :mod:`.rng`, DDP and collective timeouts in :mod:`.process_group`, the non-finite
guard in :mod:`.divergence`, the stop request in :mod:`.stop`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data.transforms import normalize_batch
from . import checkpoint as ckpt
from . import process_group
from .divergence import TrainingDivergedError, first_nonfinite, scale_gradients_to_norm, squared_norm
from .metrics_log import MetricLogger
from .process_group import CollectiveTimeoutError
from .schedule import lr_factor
from .stop import StopRequest
from .validation import Validator

__all__ = ["Trainer", "TrainSettings", "stop_request_for", "CollectiveTimeoutError", "TrainingDivergedError"]

log = logging.getLogger(__name__)

# trainer.precision -> the autocast dtype of the backbone (and the classifier's GEMMs on CUDA).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


@dataclass(kw_only=True)
class TrainSettings:
    """Everything the loop needs, as plain values, built from the config by
    ``builders.build_settings``: each field is the ``trainer.*`` key of its name unless said
    otherwise, and its default is written once, in ``conf/trainer/cpu.yaml``."""

    run_dir: Path  # the run's output folder (Hydra's run dir)
    max_steps: int
    stop_at: Optional[int]
    precision: str  # one of PRECISIONS
    grad_accum: int
    clip_grad_norm: Optional[float]
    log_every: int
    val_every: int
    val_batch_size: int
    checkpoint_every: int
    keep_checkpoints: int
    resume: str
    seed: int
    warmup_steps: int  # optim.warmup_steps
    poly_power: float  # optim.poly_power
    min_lr_factor: float  # optim.min_lr / optim.lr
    channels_last: bool
    progress_bar: bool  # on a terminal; elsewhere a log line per log_every steps
    collective_timeout_s: Optional[float]  # only named in errors; the process group enforces it
    # A run whose loss or gradient is non-finite this many steps in a row can no longer learn and
    # ends with TrainingDivergedError (fp16's loss scaler skips a few steps early on: the bound
    # leaves room for them). 0: no bound.
    max_consecutive_skips: int
    dump_margins_every: int  # >0: rank 0 writes the classifier's per-sample stats (see dump_margins)
    # A request to checkpoint and stop (partial_fc.train.stop): when this file exists for any rank,
    # or a rank receives stop_signal, every rank ends the step it is in, writes a checkpoint and
    # returns (the run continues with resume=auto). stop_file None: <run_dir>/STOP, looked for at
    # most every stop_poll_s seconds; stop_signal None: no handler.
    stop_file: Optional[Path]
    stop_poll_s: float
    stop_signal: Optional[str]
    extra_manifest: Dict = field(default_factory=dict)  # more MANIFEST.json entries (model, head)


def stop_request_for(settings: TrainSettings) -> StopRequest:
    """The stop request the settings describe (``stop_file`` defaulting to ``<run_dir>/STOP``)."""
    return StopRequest(settings.stop_file or Path(settings.run_dir) / "STOP", settings.stop_poll_s,
                       settings.stop_signal)


class Trainer:
    """Trains ``backbone`` + sharded ``classifier`` on ``batches``.

    Args:
        settings: the loop's :class:`TrainSettings` (``self.settings``).
        backbone: images -> embeddings (not yet DDP-wrapped; the trainer wraps it).
        classifier: a :class:`partial_fc.PartialFC` on this rank's classes.
        backbone_optimizer / classifier_optimizer: their optimizers; every param group's
            ``initial_lr`` is the base LR the schedule scales.
        batches: a :class:`partial_fc.train.data.BatchStream` (``next()``, ``advance(n)``,
            ``sampler``) of float32 Nx3xHxW images, or of uint8 NxHxWx3 images that the trainer
            normalises on ``device``.
        val_sets: decoded verification sets (``partial_fc.eval.verification.VerificationSet``).
        save_backbone: writes the bare backbone to a path (for ``backbone.pt``).

    The trainer is itself stateful (``state_dict``: step, skipped steps, validation history),
    saved by its :class:`~.checkpoint.Checkpointer` with the model and optimizers.
    """

    # ------------------------------------------------------------------ build
    def __init__(self, settings: TrainSettings, backbone: nn.Module, classifier: nn.Module,
                 backbone_optimizer, classifier_optimizer, batches, device: torch.device,
                 val_sets: Sequence = (), save_backbone: Optional[Callable] = None,
                 group=None, rank: int = 0, world_size: int = 1,
                 stop_request: Optional[StopRequest] = None):
        self.settings = settings
        self.device = device
        self.rank, self.world_size = rank, world_size
        self.group = group if world_size > 1 else None
        self.backbone = backbone
        self.model = process_group.wrap_ddp(backbone, device, self.group)
        self.classifier = classifier
        self.backbone_optimizer = backbone_optimizer
        self.classifier_optimizer = classifier_optimizer
        for opt in self.optimizers:
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.batches = batches
        self.val_sets = list(val_sets)
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.history: Dict[str, List] = {"val": []}
        self.samples_per_sec = 0.0
        self.checkpointer = ckpt.Checkpointer(
            settings.run_dir / "checkpoints",
            states={"backbone": backbone, "backbone_optimizer": backbone_optimizer, "scaler": self.scaler,
                    "sampler": batches.sampler},
            progress=self, classifier=classifier, classifier_optimizer=classifier_optimizer,
            rank=rank, world_size=world_size, keep=settings.keep_checkpoints, group=self.group,
            seed=settings.seed, manifest=settings.extra_manifest, save_backbone=save_backbone)
        self.logger: Optional[MetricLogger] = None
        self.phase = "start-up"  # what the loop is doing, named in collective-timeout errors
        self.stop = stop_request or stop_request_for(settings)
        self.stop_requested = False  # agreed by all ranks at the end of each step
        self.stopped_by_request = False

    @property
    def optimizers(self) -> tuple:
        """(backbone_optimizer, classifier_optimizer): every step updates both."""
        return self.backbone_optimizer, self.classifier_optimizer

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return AUTOCAST_DTYPES.get(self.settings.precision)

    @property
    def end(self) -> int:
        """The last step of this run: ``stop_at`` if set, else ``max_steps``."""
        return self.settings.stop_at if self.settings.stop_at is not None else self.settings.max_steps

    @property
    def validator(self) -> Validator:
        s = self.settings
        return Validator(self.val_sets, s.val_every, self.end, s.val_batch_size, self.device, self.group,
                         self.rank, self.world_size, self.autocast_dtype)

    # ------------------------------------------------------------------ fit
    def fit(self) -> Dict:
        """Train to ``max_steps`` (or ``stop_at``); returns a summary."""
        self.resume()
        end = self.end
        if self.step >= end and self.rank == 0:
            log.info("the run is already at step %d of %d (trainer.max_steps / trainer.stop_at): "
                     "nothing to train; raise trainer.max_steps to train further, or start a new run "
                     "(another run_name, or trainer.resume=none)", self.step, end)
        self.logger = MetricLogger(self.settings.run_dir, enabled=self.rank == 0, resume_step=self.step)
        bar = self._progress_bar(end)
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

    def resume(self) -> None:
        """Collective: load the checkpoint all ranks agree on (``trainer.resume``), if any."""
        self.phase = "resume (ranks compare the checkpoints they find)"
        with self._named_timeouts():
            path, main_from_rank0 = self.checkpointer.resume_point(self.settings.resume)
            if path is not None:
                self.load_checkpoint(path, main_from_rank0)
        self.stop.discard_stale(path)

    def _loop(self, end: int, bar) -> None:
        """Validation at step 0, then steps with logging, validation and checkpoints."""
        if self.step == 0 and self.validator.should_run(0):
            self._log(self.validate())
        window_start, window_steps = time.perf_counter(), 0
        while self.step < end:
            record = self.train_step()
            window_steps += 1
            if self._should_dump_margins(end):
                self.dump_margins()
            if self.step % self.settings.log_every == 0 or self.step == end:
                self._log_step(record, time.perf_counter() - window_start, window_steps, end, bar)
                window_start, window_steps = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            at_end = self.step == end
            paused = time.perf_counter()
            if self.validator.should_run(self.step):
                self._log(self.validate())
            if at_end or self.step % self.settings.checkpoint_every == 0 or self.stop_requested:
                self.save_checkpoint()
            window_start += time.perf_counter() - paused  # samples/s counts training only
            if self.stop_requested and self._stop_after_checkpoint(at_end):
                return

    def _stop_after_checkpoint(self, at_end: bool) -> bool:
        """Acknowledge a stop request whose checkpoint is written; True: the loop ends here."""
        self.stop.acknowledge(self.step, unfinished=not at_end)
        if at_end:
            return False
        self.stopped_by_request = True
        if self.rank == 0:
            log.info("stop requested (%s or %s): checkpoint of step %d written; stopping. "
                     "Run again with trainer.resume=auto to continue", self.stop.path,
                     self.stop.signal_name, self.step)
        return True

    # ------------------------------------------------------------------ step
    def train_step(self) -> Dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its record: ``loss`` and
        ``grad_norm`` as 0-dim tensors on the device (:meth:`read_record` reads them, which waits
        for the device: the loop does it on log steps only), ``lr`` and ``skipped_steps``.

        The trainer's own host syncs are two per step however many ranks, parameters or class
        blocks there are: the read of whether the step is finite and any rank votes to stop (one
        value), and the read of the state check's all-reduced flag (:meth:`check_state_finite`).
        """
        lr = self._set_lr()
        loss = self._accumulate_gradients()
        with self._phase("gradient norm", "all-reduce of the classifier's squared norm and the stop votes"):
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            grad_norm, stop_votes = self._grad_norm(self.stop.vote())
            finite, self.stop_requested = self._verdict(loss, grad_norm, stop_votes)
            if finite and self.settings.clip_grad_norm is not None:
                scale_gradients_to_norm(self._gradients(), self.settings.clip_grad_norm, grad_norm)
        with self._phase("optimizer step"):
            if finite:
                self._apply_gradients()
            else:  # same decision on every rank: the loss and the norm are global
                self._skip_step(loss, grad_norm)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
        self.step += 1
        self._check_skips(loss, grad_norm)
        self.check_state_finite()
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": self.skipped_steps}

    def read_record(self, record: Dict) -> Dict[str, float]:
        """A step's record with its device values read as floats (one device-to-host copy), and
        ``amp_scale`` under fp16."""
        names = [k for k, v in record.items() if torch.is_tensor(v)]
        values = torch.stack([record[k].float() for k in names]).tolist() if names else []
        out = {**record, **dict(zip(names, values))}
        if self.scaler.is_enabled():
            out["amp_scale"] = float(self.scaler.get_scale())
        return out

    @contextlib.contextmanager
    def _phase(self, name: str, collectives: str = ""):
        """Name what the loop does inside (in collective-timeout errors: ``name (collectives)``)
        and mark it as a ``trainer/<name>`` range for ``torch.profiler``."""
        self.phase = f"{name} ({collectives})" if collectives else name
        with torch.profiler.record_function(f"trainer/{name}"):
            yield

    def _set_lr(self) -> float:
        s = self.settings
        factor = lr_factor(self.step, s.max_steps, s.warmup_steps, s.poly_power, s.min_lr_factor)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
        return self.backbone_optimizer.param_groups[0]["lr"]

    def _accumulate_gradients(self) -> torch.Tensor:
        """Forward and backward over ``grad_accum`` micro-batches; their mean loss."""
        losses = []
        accum = self.settings.grad_accum
        for micro in range(accum):
            with self._phase("data loading"):
                images, labels = self._next_batch()
            losses.append(self._forward_backward(images, labels, 1.0 / accum, sync=micro == accum - 1))
            self.batches.advance(self.batches.batch_size)  # sampler positions
        return losses[0] if accum == 1 else torch.stack(losses).mean()

    def _next_batch(self):
        """The next batch on the device; uint8 NxHxWx3 images normalised there."""
        images, labels = self.batches.next()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        if images.dtype == torch.uint8:  # NxHxWx3 from workers that left normalising to us
            images = normalize_batch(images, memory_format=memory_format)
        elif self.settings.channels_last:
            images = images.contiguous(memory_format=memory_format)
        return images, labels

    def _forward_backward(self, images, labels, scale: float, sync: bool) -> torch.Tensor:
        no_sync = getattr(self.model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with context:
            with self._phase("backbone forward"), torch.autocast(
                    self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                embeddings = self.model(images)
            # The classifier takes fp32 embeddings (as insightface keeps its last layers in fp32):
            # all-gathered, and their gradients reduce-scattered, at full precision; its GEMMs
            # run in its own gemm_dtype.
            with self._phase("classifier forward", "all-gather of embeddings/labels, all-reduce of target "
                             "cosines, margin statistics and softmax normalisers"):
                loss = self.classifier(embeddings.float(), labels)
            with self._phase("backward", "reduce-scatter of embedding gradients, DDP all-reduce"):
                self.scaler.scale(loss * scale).backward()
        return loss.detach()

    def _gradients(self, module: Optional[nn.Module] = None) -> List[torch.Tensor]:
        """The gradients of ``module``'s parameters (None: the backbone's and the classifier's)."""
        modules = (self.backbone, self.classifier) if module is None else (module,)
        return [p.grad for m in modules for p in m.parameters() if p.grad is not None]

    def _grad_norm(self, stop_vote: bool = False):
        """(global L2 norm of all gradients, the number of ranks voting to stop), both 0-dim
        tensors on the device.

        Backbone grads are already summed over ranks; the classifier's squared norm is summed by
        an all-reduce, which also carries the stop votes, so every rank learns at the same step
        that one of them saw the stop file, without a collective of its own."""
        classifier_sq = squared_norm(self._gradients(self.classifier), self.device)
        # new_full fills on the device: a host-to-device copy of the vote would sync every step
        local = torch.stack([classifier_sq, classifier_sq.new_full((), float(stop_vote))])
        if self.group is not None:
            dist.all_reduce(local, group=self.group)
        return (squared_norm(self._gradients(self.backbone), self.device) + local[0]).sqrt(), local[1]

    @staticmethod
    def _verdict(loss: torch.Tensor, grad_norm: torch.Tensor, stop_votes: torch.Tensor):
        """(whether the loss and the gradient norm are finite, whether any rank votes to stop),
        from one device-to-host read of a value that encodes both."""
        finite = (torch.isfinite(loss) & torch.isfinite(grad_norm)).to(torch.int64)
        code = int(finite + 2 * (stop_votes > 0).to(torch.int64))
        return bool(code & 1), bool(code & 2)

    def _apply_gradients(self) -> None:
        """Step both optimizers on the (unscaled, clipped) gradients.

        Not through ``GradScaler.step``: under fp16 it reads each optimizer's inf/NaN flag on the
        host (a sync each) to decide what the finite global norm has decided already; the scale
        update reads the same flags on the device."""
        for opt in self.optimizers:
            opt.step()
        self.scaler.update()
        self.consecutive_skips = 0

    def _skip_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A non-finite loss or gradient: no update (fp16: the loss scale backs off)."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); skipped",
                    self.step, float(loss), float(grad_norm))
        if self.scaler.is_enabled():
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())

    def _check_skips(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Raise TrainingDivergedError after ``max_consecutive_skips`` skipped steps in a row."""
        bound = self.settings.max_consecutive_skips
        if bound and self.consecutive_skips >= bound:
            raise TrainingDivergedError(
                f"steps {self.step - bound + 1}..{self.step}: {bound} consecutive steps had a non-finite "
                f"loss or gradient (last loss={float(loss)}, grad_norm={float(grad_norm)}); the run can no "
                f"longer learn (trainer.max_consecutive_skips={bound}). Lower optim.lr or set "
                f"trainer.clip_grad_norm, then resume: {self._last_good_checkpoint()}"
            )

    def _named_state(self):
        """(name, tensor) of every parameter and buffer this rank holds (BatchNorm statistics
        and the classifier shard included)."""
        for prefix, module in (("backbone", self.backbone), ("classifier", self.classifier)):
            for name, tensor in module.named_parameters():
                yield f"{prefix} parameter {name}", tensor
            for name, tensor in module.named_buffers():
                yield f"{prefix} buffer {name}", tensor

    def _last_good_checkpoint(self) -> str:
        """Where a diverged run can resume from, in words."""
        path = ckpt.find_latest(self.checkpointer.root)
        if path is None:
            return f"no checkpoint has been written yet in {self.checkpointer.root}"
        return f"the last good checkpoint is {path}"

    def check_state_finite(self) -> None:
        """Raise TrainingDivergedError on every rank when any rank's model state holds NaN/inf;
        the message names the first such tensor (on the rank that holds it) and the step.

        Collective. A constant number of operations and one host read, however many tensors:
        the squared norm of the whole state (:func:`.divergence.squared_norm`), all-reduced as a
        flag. Only a non-finite norm looks tensor by tensor, to name the culprit (and to tell a
        NaN from finite values whose squares overflowed, which are no divergence)."""
        with self._phase("state check", "all-reduce of a non-finite flag"):
            state = [t for _, t in self._named_state() if t.is_floating_point()]
            if not self._any_rank(~torch.isfinite(squared_norm(state, self.device))):
                return
            found = first_nonfinite(self._named_state())
            if not self._any_rank(torch.tensor(found is not None, device=self.device)):
                return
        raise TrainingDivergedError(
            f"rank {self.rank}: after step {self.step} the model state is non-finite: "
            f"{found or 'a tensor of another rank (its log names it)'}. The run has diverged and stops "
            f"without writing a checkpoint ({self._last_good_checkpoint()}). Lower optim.lr or set "
            "trainer.clip_grad_norm, then resume"
        )

    def _any_rank(self, flag: torch.Tensor) -> bool:
        """Whether ``flag`` (a 0-dim bool tensor) is true on any rank: an all-reduce and one read."""
        flag = flag.to(torch.float32)
        if self.group is not None:
            dist.all_reduce(flag, group=self.group)
        return bool(flag > 0)

    # ------------------------------------------------------------------ log
    def _progress_bar(self, end: int):
        """A tqdm bar on rank 0's terminal; None elsewhere (into a file such as slurm-*.out a log
        line per log interval instead)."""
        if self.rank == 0 and self.settings.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            return tqdm(total=end, initial=self.step, desc="train", dynamic_ncols=True)
        return None

    def _log_step(self, record: Dict, elapsed: float, window_steps: int, end: int, bar) -> None:
        """Log a step's record with the samples/s of the window since the last one."""
        record = self.read_record(record)
        global_samples = window_steps * self.batches.batch_size * self.world_size * self.settings.grad_accum
        self.samples_per_sec = global_samples / max(elapsed, 1e-9)
        record["samples_per_sec"] = self.samples_per_sec
        record.update(self.classifier_record())
        self._log(record)
        if "margin" in self.classifier.last_stats:
            self.logger.histogram(self.step, "npc/margin", self.classifier.last_stats["margin"])
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{self.samples_per_sec:.0f}")
        elif self.rank == 0:
            log.info("step %d/%d: loss %.4f, %.0f samples/s", self.step, end, record["loss"],
                     self.samples_per_sec)

    def _log(self, record: Dict[str, float]) -> None:
        if record:
            self.logger.log(self.step, record)
            if self.rank == 0 and any(k.startswith("val/") for k in record):
                log.info("step %d: %s", self.step,
                         ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith("/acc")))

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

    def _should_dump_margins(self, end: int) -> bool:
        every = self.settings.dump_margins_every
        return bool(every) and (self.step == 1 or self.step % every == 0 or self.step == end)

    def dump_margins(self) -> Optional[Path]:
        """Write the last step's per-sample classifier statistics (``target_cos`` and, for
        NPCFace, ``margin`` / ``hard_count``; the same global batch on every rank) to
        ``run_dir/margins/step_XXXXXXX.npz``; rank 0 only. Returns the path written."""
        stats = self.classifier.last_stats
        if self.rank != 0 or not stats:
            return None
        folder = self.settings.run_dir / "margins"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:07d}.npz"
        arrays = {k: v.detach().cpu().double().numpy() for k, v in stats.items() if v.dim() == 1}
        np.savez(path, step=np.int64(self.step), **arrays)
        return path

    def validate(self) -> Dict[str, float]:
        """Collective: score the backbone on ``val_sets`` (see :class:`Validator`) with rank 0's
        BatchNorm statistics; the results join ``history``."""
        with self._phase("validation", "broadcast of rank 0's buffers, all-gather of embeddings"):
            self.sync_buffers()
            results = self.validator.run(self.backbone, self.step)
        if results:
            self.history["val"].append({"step": self.step, **results})
        return results

    def summary(self) -> Dict:
        vals = self.history.get("val", [])
        run_dir = self.settings.run_dir
        return {
            "steps": self.step,
            "stopped_by_request": self.stopped_by_request,
            "skipped_steps": self.skipped_steps,
            "samples_per_sec": self.samples_per_sec,
            "val_first": vals[0] if vals else None,
            "val_last": vals[-1] if vals else None,
            "run_dir": str(run_dir),
            "checkpoints": str(run_dir / "checkpoints"),
            "tensorboard": str(run_dir / "tensorboard"),
            "metrics": str(run_dir / "metrics.jsonl"),
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict:
        """The loop's progress, saved at the top level of ``trainer.pt``."""
        return {"step": self.step, "skipped_steps": self.skipped_steps, "history": json.dumps(self.history)}

    def load_state_dict(self, state: Dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.history = json.loads(state["history"])

    def sync_buffers(self) -> None:
        """Give every rank rank 0's backbone buffers (BatchNorm running statistics).

        Ranks keep their own statistics while training (no per-step broadcast); before evaluating
        or saving, all ranks take rank 0's, so validation scores exactly the saved backbone.
        """
        process_group.broadcast_buffers(self.backbone, self.group)

    def save_checkpoint(self) -> Path:
        with self._phase("checkpoint", "broadcast of rank 0's buffers"):
            self.sync_buffers()
        self.check_state_finite()  # never write a checkpoint that cannot be resumed from
        with self._phase("checkpoint", "barriers around the shard writes"):
            path = self.checkpointer.save(self.step)
        if self.rank == 0:
            log.info("checkpoint written: %s", path)
        return path

    def load_checkpoint(self, path: Path, main_from_rank0: bool = False) -> None:
        """Restore from ``path``; ``main_from_rank0``: the trainer state comes from rank 0 (nodes
        that do not share a filesystem have only their own shards)."""
        self.checkpointer.load(path, main_from_rank0)

    # ------------------------------------------------------------------ collectives
    def _named_timeouts(self):
        """A collective timing out inside becomes a :class:`CollectiveTimeoutError` naming
        ``phase``, this rank and the step."""
        return process_group.named_timeouts(self.group, lambda err: process_group.timeout_error(
            err, self.group, self.rank, self.world_size, self.step, self.phase,
            self.settings.collective_timeout_s))
