"""The model-parallel Partial FC classifier."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .distributed import ProcessGroupInfo, all_gather_rows, gather_sizes
from .margin_loss import materialized_margin_loss
from .sampling import sample_classes, sampling_seed
from .sharding import shard_range


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
    """

    def __init__(
        self,
        head: nn.Module,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        process_group=None,
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if int(embedding_size) < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        self.pg = ProcessGroupInfo(process_group)
        self.head = head
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.class_start, self.num_local = shard_range(
            self.num_classes, self.pg.world_size, self.pg.rank
        )
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        # Sampling step counter: part of the state so a resumed run draws the same classes.
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        self.sampled_index: Optional[torch.Tensor] = None
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
            f"sample_rate={self.sample_rate}, world_size={self.world_size}"
        )

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
        """Rows scored this step and the local row index (into them) of each label, or -1."""
        device = self.weight.device
        owned = (local_labels >= 0) & (local_labels < self.num_local)
        num_sample = int(self.sample_rate * self.num_local)
        if not self.training or num_sample >= self.num_local:
            index = torch.arange(self.num_local, device=device)
            return index, self.weight, torch.where(owned, local_labels, -1)
        positives = torch.unique(local_labels[owned])
        index = sample_classes(
            positives, self.num_local, num_sample, self._generator(device, int(self.sample_step))
        )
        remapped = torch.searchsorted(index, local_labels.clamp(0, max(self.num_local - 1, 0)))
        return index, self.weight[index], torch.where(owned, remapped, -1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_inputs(embeddings, labels)
        group = self.pg.group if self.pg.distributed else None
        sizes = gather_sizes(embeddings.shape[0], embeddings.device, group)
        if sum(sizes) == 0:
            raise ValueError("the global batch is empty")
        global_embeddings = all_gather_rows(embeddings, sizes, group)
        global_labels = all_gather_rows(labels.to(torch.int64), sizes, group).to(self.weight.device)
        self._check_labels(global_labels)

        index, weight, target_index = self._select_classes(global_labels - self.class_start)
        loss, diagnostics = materialized_margin_loss(
            self.head, global_embeddings.to(self.weight.device), weight, target_index, group
        )
        self.sampled_index = index
        self.last_stats = diagnostics
        if self.training:
            self.sample_step += 1
        return loss.mean()
