"""``PartialFC``: the class-sharded margin-softmax classifier, one step read top to bottom in
:meth:`PartialFC.forward` (docs/ALGORITHM.md, section 5)."""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
from torch import nn

from .chunked import chunked_margin_loss
from .collectives import ProcessGroupInfo, all_gather_rows, gather_header, gather_rows, host_values
from .numerics import compute_dtype, resolve_gemm_dtype
from .plan import IMPLS, SWEEPS, StepPlan, check_size, plan_step, scored_bound
from .reference import reference_margin_loss
from .sampling import positive_rows, sample_classes, sampling_seed
from .sharding import shard_range
from .tiles import Tiles, compiler_unavailable_reason

# The step's first all-gather carries, per rank: batch size, bad labels, first bad label, tiles
# compiled (PartialFC._header; partial_fc.classifier.traffic models it).
HEADER_FIELDS = 4

GEMM_DTYPES = {
    None: None, "auto": None,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "fp32": torch.float32,
}


class PartialFC(nn.Module):
    """A class-sharded margin-softmax classifier with optional Partial FC sampling.

    Each rank holds ``weight`` [num_local, embedding_size], the rows of classes
    ``[class_start, class_start + num_local)`` (see :func:`partial_fc.shard_range`). ``forward``
    all-gathers the embeddings and labels of every rank, scores the global batch against this
    rank's (sampled) classes with ``head`` and returns the mean cross-entropy over the global
    batch, the same value on every rank. After ``loss.backward()`` the caller's embeddings hold
    the true gradient of that loss and ``weight.grad`` this rank's rows' gradient.

    The defaults are what the training config runs (``conf/head/*.yaml``; a test holds them
    equal). Args:
        head: a :class:`npc_head.MarginHead` (NPCFace, ArcFace, AdaFace, ...).
        embedding_size: width D of the embeddings. num_classes: identities C over all ranks.
        sample_rate: fraction of this rank's classes scored per training step, in (0, 1];
            positives of the global batch are always scored; evaluation mode scores all.
        process_group: the group to shard over; None: the default group when
            ``torch.distributed`` is initialised, else a single process.
        seed: base seed of the class sampling (per rank and step, see ``sampling_seed``).
        impl: ``"reference"`` materialises the [global batch x scored classes] logits,
            ``"chunked"`` walks them tile by tile (same results, none of that memory),
            ``"auto"`` picks per step (:func:`partial_fc.classifier.plan.plan_step`).
        block_size: classes per tile of the chunked class sweep (None: by the device).
        gemm_dtype: the GEMMs' input dtype (``"bfloat16"``, ``"float16"``, ``"float32"``);
            None follows autocast, else the embeddings. Statistics stay in fp32 or wider.
        fused: the chunked path's tile functions run compiled, one fused pass per tile and
            direction (``torch.compile``: C++ on CPU, Triton on CUDA); False, or no compiler on
            some rank (one warning), runs the same functions eagerly.
        sweep: the chunked path's order: ``"rows"`` (three GEMMs), ``"classes"`` (four) or
            ``"auto"`` (rows when the tiles run compiled and a chunk fits the device's budget).

    After a forward: ``last_plan`` (:class:`partial_fc.classifier.plan.StepPlan`, the same on
    every rank), ``last_impl``, ``last_stats`` (detached per-row diagnostics of the global
    batch), ``sampled_index`` (the scored local rows).
    """

    def __init__(self, head: nn.Module, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, process_group=None, seed: int = 0, impl: str = "auto",
                 block_size: Optional[int] = None, gemm_dtype: Optional[str] = None,
                 fused: bool = True, sweep: str = "auto"):
        super().__init__()
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {SWEEPS}, got {sweep!r}")
        check_size("block_size", block_size)
        if gemm_dtype not in GEMM_DTYPES:
            names = sorted(k for k in GEMM_DTYPES if k is not None)
            raise ValueError(f"gemm_dtype must be None or one of {names}, got {gemm_dtype!r}")
        if int(embedding_size) < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        self.pg = ProcessGroupInfo(process_group)
        self.head = head
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        self.impl, self.block_size, self.sweep = impl, block_size, sweep
        self.gemm_dtype, self.fused = GEMM_DTYPES[gemm_dtype], bool(fused)
        self.class_start, self.num_local = shard_range(self.num_classes, self.pg.world_size,
                                                       self.pg.rank)
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        # Sampling step counter: part of the state so a resumed run draws the same classes.
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        self._step_seen = None  # (buffer, its _version, its value): read it only when rewritten
        self._tiles: Optional[Tiles] = None
        self._no_compiler: Optional[str] = None  # why fused tiles cannot compile here, until said
        self.sampled_index: Optional[torch.Tensor] = None
        # Rows scored by training forwards since the optimizer last consumed them (several
        # forwards per step with gradient accumulation); see rows_to_update().
        self._pending_rows: list = []
        self._pending_all = False
        self.last_plan: Optional[StepPlan] = None
        self.last_stats: Dict[str, torch.Tensor] = {}

    @property
    def world_size(self) -> int:
        return self.pg.world_size

    @property
    def rank(self) -> int:
        return self.pg.rank

    @property
    def last_impl(self) -> Optional[str]:
        """The path of the last forward: ``"reference"`` or ``"chunked"``."""
        return None if self.last_plan is None else self.last_plan.impl

    def resolve_impl(self, global_batch: int, num_scored: int) -> str:
        """The path a step of ``global_batch`` rows against at most ``num_scored`` classes per
        rank takes (:func:`partial_fc.classifier.plan.plan_step`'s choice)."""
        return plan_step(self.impl, "auto", global_batch, num_scored, "cpu", False).impl

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"class_start={self.class_start}, num_local={self.num_local}, "
                f"sample_rate={self.sample_rate}, world_size={self.world_size}, impl={self.impl}, "
                f"fused={self.fused}, sweep={self.sweep}")

    def rows_to_update(self) -> Optional[torch.Tensor]:
        """Sorted local rows scored by the training forwards (with gradient) since the last
        :meth:`reset_rows_to_update`: the rows whose gradient can be non-zero, which a row-sparse
        optimizer updates. ``None`` means every row (some forward scored them all, or no forward
        was recorded). Several forwards (gradient accumulation) cost a host sync here."""
        if self._pending_all or not self._pending_rows:
            return None
        if len(self._pending_rows) == 1:
            return self._pending_rows[0]
        return torch.unique(torch.cat(self._pending_rows))

    def reset_rows_to_update(self) -> None:
        self._pending_rows, self._pending_all = [], False

    def tiles(self, device: torch.device) -> Tiles:
        """The head's tile functions: compiled when ``fused`` and ``device`` has a compiler,
        else eager (the first chunked step says why, once)."""
        if self._tiles is None:
            self._no_compiler = compiler_unavailable_reason(device) if self.fused else None
            self._tiles = Tiles(self.head, compile=self.fused and self._no_compiler is None)
        return self._tiles

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [batch, {self.embedding_size}], got "
                             f"{tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match "
                             f"{embeddings.shape[0]} embeddings")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class ids, got {labels.dtype}")

    def _header(self, labels: torch.Tensor, compiled: bool):
        """Every rank's [batch size, bad labels, first bad label, tiles compiled], in one
        all-gather and one host read: the step's sizes, its label check and the ranks' tiles."""
        bad = (labels < 0) | (labels >= self.num_classes)
        first = (labels.gather(0, bad.to(torch.int8).argmax()[None])[0] if labels.numel()
                 else labels.new_zeros(()))
        # Constants by fill kernels, not host-to-device copies (a copy from pageable memory syncs).
        const = lambda v: torch.full((), v, dtype=torch.int64, device=labels.device)  # noqa: E731
        values = torch.stack([const(labels.shape[0]), bad.sum(), first.to(torch.int64),
                              const(int(compiled))])
        header = gather_header(values, self.pg.group if self.pg.distributed else None)
        bad_ranks = [r for r, row in enumerate(header) if row[1]]
        if bad_ranks:
            where = f", the first on rank {bad_ranks[0]}" if len(header) > 1 else ""
            raise ValueError(f"label {header[bad_ranks[0]][2]} outside [0, {self.num_classes}) "
                             f"({sum(row[1] for row in header)} bad label(s) in the global "
                             f"batch{where})")
        return [row[0] for row in header], all(row[3] for row in header)

    def _sampling_step(self) -> int:
        """``sample_step`` as a host int; read from the device only after something else wrote
        the buffer (a load, a move), seen by the tensor's version counter."""
        buf, seen = self.sample_step, self._step_seen
        if seen is None or seen[0] is not buf or seen[1] != buf._version:
            self._step_seen = seen = (buf, buf._version, int(host_values(buf)))
        return seen[2]

    def _advance_sampling_step(self) -> None:
        step = self._sampling_step()
        self.sample_step.add_(1)
        self._step_seen = (self.sample_step, self.sample_step._version, step + 1)

    def _select_classes(self, local_labels: torch.Tensor):
        """Rows scored this step (sorted local indices), whether that is every row, and the
        index (into the scored rows) of each label, or -1."""
        owned = (local_labels >= 0) & (local_labels < self.num_local)
        num_sample = int(self.sample_rate * self.num_local)
        if not self.training or num_sample >= self.num_local:
            index = torch.arange(self.num_local, device=local_labels.device)
            return index, True, torch.where(owned, local_labels, -1)
        is_positive = positive_rows(local_labels, self.num_local)
        # Positives can outnumber num_sample only when labels do: then their count is read.
        count = host_values(is_positive.sum()) if local_labels.numel() > num_sample else None
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed(sampling_seed(self.seed, self.rank, self._sampling_step()))
        index = sample_classes(is_positive, num_sample, generator, count)
        remapped = torch.searchsorted(index, local_labels.clamp(0, self.num_local - 1))
        return index, index.numel() == self.num_local, torch.where(owned, remapped, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(embeddings, labels)
        group = self.pg.group if self.pg.distributed else None
        device = self.weight.device
        tiles = self.tiles(device)
        sizes, compiled = self._header(labels, tiles.active)
        rows = sum(sizes)
        if rows == 0:
            raise ValueError("the global batch is empty")
        global_embeddings = all_gather_rows(embeddings, sizes, group).to(device)
        global_labels = gather_rows(labels.to(torch.int64), sizes, group).to(device)
        index, every_row, target_index = self._select_classes(global_labels - self.class_start)
        scored = scored_bound(self.num_classes, self.world_size, self.sample_rate, rows,
                              self.training)
        plan = plan_step(self.impl, self.sweep, rows, scored, device.type, compiled,
                         self.block_size)
        work = compute_dtype(global_embeddings, self.weight)
        gemm = resolve_gemm_dtype(global_embeddings, work, self.gemm_dtype)
        if plan.impl == "chunked" and self._no_compiler:
            warnings.warn(f"PartialFC(fused=True): {self._no_compiler}; the tile functions run "
                          f"eagerly", RuntimeWarning, stacklevel=2)
            self._no_compiler = None
        # Both paths pick every dtype themselves: autocast would recast their fp32 statistics.
        with torch.autocast(device.type, enabled=False):
            if plan.impl == "chunked":
                loss, diagnostics = chunked_margin_loss(
                    self.head, global_embeddings, self.weight, target_index, group,
                    row_index=None if every_row else index, gemm_dtype=gemm, tiles=tiles,
                    plan=plan, reduction="mean")
            else:
                weight = self.weight if every_row else self.weight[index]
                loss, diagnostics = reference_margin_loss(self.head, global_embeddings, weight,
                                                          target_index, group, gemm, "mean")
        self._record(plan, index, every_row, diagnostics)
        return loss

    def _record(self, plan: StepPlan, index, every_row: bool, diagnostics) -> None:
        self.last_plan, self.sampled_index, self.last_stats = plan, index, diagnostics
        if self.training and torch.is_grad_enabled() and self.weight.requires_grad:
            if every_row:
                self._pending_all = True
            else:
                self._pending_rows.append(index)
        if self.training:
            self._advance_sampling_step()
