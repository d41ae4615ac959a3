"""The model-parallel Partial FC classifier: ``PartialFC`` shards the class centres, gathers the
global batch and runs each step on one of two paths, the reference path
(:func:`partial_fc.reference.reference_margin_loss`, ``impl="reference"``) or the chunked path
(:func:`partial_fc.chunked.chunked_margin_loss`, ``impl="chunked"``, optionally with the fused
tiles of :mod:`partial_fc.fused_tiles`)."""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
from torch import nn

from .chunked import SWEEPS, chunked_margin_loss
from .distributed import ProcessGroupInfo, all_gather_rows, gather_sizes
from .fused_tiles import FusedTiles, compiler_unavailable_reason
from .reference import reference_margin_loss
from .sampling import sample_classes, sampling_seed
from .sharding import shard_range

IMPLS = ("auto", "reference", "chunked")
GEMM_DTYPES = {
    None: None, "auto": None,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "fp32": torch.float32,
}
# impl="auto" picks the chunked path once the [global batch x scored classes] fp32 logits of the
# reference path would exceed this many bytes (see README, "Classifier implementations").
AUTO_CHUNKED_LOGIT_BYTES = 64 * 2**20


class PartialFC(nn.Module):
    """A class-sharded margin-softmax classifier with optional Partial FC sampling.

    Each rank holds ``weight`` [num_local, embedding_size], the rows of classes
    ``[class_start, class_start + num_local)`` (see :func:`partial_fc.shard_range`). ``forward``
    all-gathers the embeddings and labels of every rank, scores the global batch against this
    rank's (sampled) classes with ``head`` and returns the mean cross-entropy over the global
    batch, the same value on every rank. After ``loss.backward()`` the caller's embeddings hold
    the true gradient of that loss and ``weight.grad`` this rank's rows' gradient.

    Args:
        head: a :class:`npc_head.MarginHead` (NPCFace, ArcFace, CosFace, ...).
        embedding_size: width D of the embeddings.
        num_classes: total number of identities C over all ranks.
        sample_rate: fraction of this rank's classes scored per training step, in (0, 1].
            Positives of the global batch are always scored. Evaluation mode scores all.
        process_group: the group to shard over; None means the default group when
            ``torch.distributed`` is initialised, else a single process.
        seed: base seed of the class sampling (per rank and step, see ``sampling_seed``).
        impl: ``"reference"`` materialises the [global batch x scored classes] logits;
            ``"chunked"`` walks the classes in blocks (:func:`partial_fc.chunked.chunked_margin_loss`),
            same results without that memory; ``"auto"`` (default) picks per step: chunked when
            the reference's fp32 logits would exceed ``AUTO_CHUNKED_LOGIT_BYTES``. The choice of
            the last forward is ``last_impl``.
        block_size: classes per block of the chunked path; None picks by device and batch
            (:func:`partial_fc.chunked.default_block_size`).
        gemm_dtype: input dtype of the chunked path's GEMMs (``"bfloat16"``, ``"float16"``,
            ``"float32"``); None follows autocast, else the embeddings' dtype. Statistics and the
            softmax stay in fp32 or wider.
        fused: the chunked path runs each tile's elementwise work as one compiled pass per
            direction (:mod:`partial_fc.fused_tiles`; ``torch.compile``: C++ on CPU, Triton on
            CUDA; compiled on first use, sizes dynamic). False keeps the head's one-operation-
            at-a-time tiles, which are also what runs, after one warning, when no compiler
            (C++ on CPU, Triton on CUDA) is available or the compile fails.
        sweep: how the chunked path walks the [global batch x classes] tiles (see
            :func:`partial_fc.chunked.chunked_margin_loss`): ``"auto"`` (default; with ``fused``,
            chunks of rows against all classes, three GEMMs, when the tile fits the device's
            budget, else blocks of classes), ``"rows"`` or ``"classes"`` (four GEMMs, the
            forward tile recomputed in backward).
    """

    def __init__(
        self,
        head: nn.Module,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        process_group=None,
        seed: int = 0,
        impl: str = "auto",
        block_size: Optional[int] = None,
        gemm_dtype: Optional[str] = None,
        fused: bool = False,
        sweep: str = "auto",
    ):
        super().__init__()
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
        ):
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        if gemm_dtype not in GEMM_DTYPES:
            names = sorted(k for k in GEMM_DTYPES if k is not None)
            raise ValueError(f"gemm_dtype must be None or one of {names}, got {gemm_dtype!r}")
        if sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {SWEEPS}, got {sweep!r}")
        if int(embedding_size) < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        self.pg = ProcessGroupInfo(process_group)
        self.head = head
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.impl = impl
        self.block_size = block_size
        self.gemm_dtype = GEMM_DTYPES[gemm_dtype]
        self.fused = bool(fused)
        self.sweep = sweep
        self._tiles: Optional[FusedTiles] = None  # built at the first fused chunked step
        self.last_impl: Optional[str] = None
        self.class_start, self.num_local = shard_range(
            self.num_classes, self.pg.world_size, self.pg.rank
        )
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        # Sampling step counter: part of the state so a resumed run draws the same classes.
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        self.sampled_index: Optional[torch.Tensor] = None
        # Rows scored by training forwards since the optimizer last consumed them (several
        # forwards per step with gradient accumulation); see rows_to_update().
        self._pending_rows: list = []
        self._pending_all = False
        self.last_stats: Dict[str, torch.Tensor] = {}

    @property
    def world_size(self) -> int:
        return self.pg.world_size

    @property
    def rank(self) -> int:
        return self.pg.rank

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_start={self.class_start}, num_local={self.num_local}, "
            f"sample_rate={self.sample_rate}, world_size={self.world_size}, impl={self.impl}, "
            f"fused={self.fused}, sweep={self.sweep}"
        )

    def resolve_impl(self, global_batch: int, num_scored: int) -> str:
        """The implementation a step with these sizes runs: ``impl`` unless it is ``"auto"``."""
        if self.impl != "auto":
            return self.impl
        logit_bytes = 4 * int(global_batch) * int(num_scored)
        return "chunked" if logit_bytes > AUTO_CHUNKED_LOGIT_BYTES else "reference"

    def _fused_tiles(self, device: torch.device) -> Optional[FusedTiles]:
        """The head's compiled tile passes when ``fused`` and a compiler is available."""
        if not self.fused:
            return None
        if self._tiles is None:
            reason = compiler_unavailable_reason(device)
            if reason is not None:
                warnings.warn(f"PartialFC(fused=True): {reason}; the chunked head runs unfused",
                              RuntimeWarning, stacklevel=3)
                self.fused = False
                return None
            self._tiles = FusedTiles(self.head)
        return self._tiles

    def rows_to_update(self) -> Optional[torch.Tensor]:
        """Sorted local rows scored by the training forwards (with gradient) since the last
        :meth:`reset_rows_to_update`: the rows whose gradient can be non-zero, which a row-sparse
        optimizer updates. ``None`` means every row (some forward scored them all, or no forward
        was recorded)."""
        if self._pending_all or not self._pending_rows:
            return None
        if len(self._pending_rows) == 1:
            return self._pending_rows[0]
        return torch.unique(torch.cat(self._pending_rows))

    def reset_rows_to_update(self) -> None:
        self._pending_rows, self._pending_all = [], False

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [batch, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match {embeddings.shape[0]} embeddings"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class ids, got {labels.dtype}")

    def _check_labels(self, labels: torch.Tensor) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(
                f"label {first} outside [0, {self.num_classes}) "
                f"({int(bad.sum())} bad label(s) in the global batch)"
            )

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling_seed(self.seed, self.rank, step))
        return generator

    def _select_classes(self, local_labels: torch.Tensor):
        """Rows scored this step (sorted local indices), whether that is every row, and the
        index (into the scored rows) of each label, or -1."""
        device = self.weight.device
        owned = (local_labels >= 0) & (local_labels < self.num_local)
        num_sample = int(self.sample_rate * self.num_local)
        if not self.training or num_sample >= self.num_local:
            index = torch.arange(self.num_local, device=device)
            return index, True, torch.where(owned, local_labels, -1)
        positives = torch.unique(local_labels[owned])
        index = sample_classes(
            positives, self.num_local, num_sample, self._generator(device, int(self.sample_step))
        )
        remapped = torch.searchsorted(index, local_labels.clamp(0, max(self.num_local - 1, 0)))
        return index, index.numel() == self.num_local, torch.where(owned, remapped, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(embeddings, labels)
        group = self.pg.group if self.pg.distributed else None
        sizes = gather_sizes(embeddings.shape[0], embeddings.device, group)
        if sum(sizes) == 0:
            raise ValueError("the global batch is empty")
        global_embeddings = all_gather_rows(embeddings, sizes, group)
        global_labels = all_gather_rows(labels.to(torch.int64), sizes, group).to(self.weight.device)
        self._check_labels(global_labels)

        index, every_row, target_index = self._select_classes(global_labels - self.class_start)
        global_embeddings = global_embeddings.to(self.weight.device)
        impl = self.resolve_impl(global_embeddings.shape[0], index.numel())
        if impl == "chunked":
            loss, diagnostics = chunked_margin_loss(
                self.head, global_embeddings, self.weight, target_index, group,
                block_size=self.block_size, row_index=None if every_row else index,
                gemm_dtype=self.gemm_dtype, tiles=self._fused_tiles(self.weight.device),
                sweep=self.sweep,
            )
        else:
            weight = self.weight if every_row else self.weight[index]
            loss, diagnostics = reference_margin_loss(
                self.head, global_embeddings, weight, target_index, group
            )
        self.last_impl = impl
        self.sampled_index = index
        if self.training and torch.is_grad_enabled() and self.weight.requires_grad:
            if every_row:
                self._pending_all = True
            else:
                self._pending_rows.append(index)
        self.last_stats = diagnostics
        if self.training:
            self.sample_step += 1
        return loss.mean()
