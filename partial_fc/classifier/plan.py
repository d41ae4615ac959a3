"""What one classifier step runs: the path, the sweep, its tile sizes and whether the tiles run
compiled (docs/ALGORITHM.md, section 5a).

Each choice changes the step's collectives or its numerics, so it is made from values every rank
holds alike: the global batch, the class count, world size and sample rate (through
:func:`scored_bound`, the most classes any rank can score) and the tiles' state, which the ranks
exchange in the step's first all-gather. Never from a rank's own row count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .sharding import shard_range

IMPLS = ("auto", "reference", "chunked")
SWEEPS = ("auto", "rows", "classes")

# impl="auto" takes the chunked path once the [global batch x scored classes] fp32 logits of the
# reference path would exceed this many bytes (see README, "Classifier implementations").
AUTO_CHUNKED_LOGIT_BYTES = 64 * 2**20

# Elements of one [rows x block] tile of the class sweep, per device type. CPU: 4M (4096 classes
# at Bg=1024) measured best on a 2-core machine (bench/RESULTS.md); CUDA: 64K classes at
# Bg=1024 (a 256 MiB fp32 tile), room for weight, gradient and momentum within 8 GiB at 1M.
DEFAULT_TILE_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}

# The row sweep (three GEMMs, no recomputed tile) holds a [chunk rows x scored classes] tile
# within this budget, and takes at least MIN_CHUNK_ROWS rows: thinner chunks make thin GEMMs and
# re-read the weight gradient they accumulate (bench/row_chunks.py, bench/RESULTS.md: on 2 CPU
# cores at 100K classes the three GEMMs in chunks of 512 rows cost 1.0-1.1x the class-block
# floor, of 256 rows 1.2-1.3x, below 128 rows more than the class sweep's four GEMMs). A GPU
# hides that re-read only behind one chunk of the whole batch.
ROW_TILE_ELEMENTS = {"cpu": 1 << 26, "cuda": 1 << 26}
MIN_CHUNK_ROWS = {"cpu": 128}


@dataclass(frozen=True)
class StepPlan:
    """One step's choices, equal on every rank (``PartialFC.last_plan``).

    ``impl``: "reference" or "chunked"; ``chunk_rows``: rows per chunk of the row sweep, 0 for
    the class sweep (and the reference path); ``block_size``: classes per tile of the class
    sweep; ``compiled``: the tile functions run compiled (False: the same functions eagerly)."""

    impl: str
    chunk_rows: int = 0
    block_size: int = 0
    compiled: bool = False

    @property
    def sweep(self) -> Optional[str]:
        """"rows" or "classes" on the chunked path, None on the reference path."""
        if self.impl != "chunked":
            return None
        return "rows" if self.chunk_rows else "classes"


def check_size(name: str, value) -> None:
    """Refuse a tile size (``block_size``, ``chunk_rows``) that is not a positive int or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def scored_bound(num_classes: int, world_size: int, sample_rate: float, rows: int,
                 training: bool) -> int:
    """The most classes any rank scores in a step of ``rows`` global rows: rank 0's row count
    (it owns the most), or with sampling its ``int(sample_rate * count)`` rows, more only when
    the batch's positives exceed that (at most ``rows``). The same on every rank."""
    most = shard_range(num_classes, world_size, 0)[1]
    num_sample = int(sample_rate * most)
    if not training or num_sample >= most:
        return most
    return min(most, max(num_sample, int(rows)))


def _kind(device) -> str:
    """The budgets' key of ``device`` (a torch.device or its type): its type, CUDA's else."""
    kind = torch.device(device).type
    return kind if kind in DEFAULT_TILE_ELEMENTS else "cuda"


def default_block_size(rows: int, device) -> int:
    """Classes per block so that one [rows x block] tile holds about the device's budget."""
    return max(256, DEFAULT_TILE_ELEMENTS[_kind(device)] // max(1, int(rows)))


def row_chunk_size(rows: int, classes: int, device, minimum: bool = True) -> int:
    """Rows per chunk of the row sweep for a global batch of ``rows`` against ``classes`` scored
    classes (the most any rank scores), balanced over the chunks, within the device's tile
    budget (``ROW_TILE_ELEMENTS``; at least one row). With ``minimum``, 0 when that chunk would
    have fewer rows than the device's minimum (``MIN_CHUNK_ROWS``, or ``rows`` when fewer;
    elsewhere the whole batch), where the class sweep is the faster one."""
    kind = _kind(device)
    rows = max(1, int(rows))
    fit = max(1, min(rows, ROW_TILE_ELEMENTS[kind] // max(1, int(classes))))
    if minimum and fit < min(rows, MIN_CHUNK_ROWS.get(kind, rows)):
        return 0
    chunks = -(-rows // fit)
    return -(-rows // chunks)


def plan_step(impl: str, sweep: str, rows: int, scored: int, device, compiled: bool,
              block_size: Optional[int] = None, chunk_rows: Optional[int] = None) -> StepPlan:
    """The plan of a step of ``rows`` global rows against at most ``scored`` classes per rank,
    on ``device`` (a torch.device or its type).

    ``impl`` / ``sweep``: as :class:`partial_fc.PartialFC` takes them ("auto": the reference
    path while its fp32 logits fit ``AUTO_CHUNKED_LOGIT_BYTES``; the row sweep when the tiles
    run compiled and :func:`row_chunk_size` allows a chunk); ``compiled``: every rank's tiles
    run compiled; ``block_size`` / ``chunk_rows``: fixed sizes (None: by the device's budget).
    An empty batch takes the class sweep (the row sweep has no chunk to walk)."""
    if impl not in IMPLS or sweep not in SWEEPS:
        raise ValueError(f"impl must be one of {IMPLS} and sweep one of {SWEEPS}, got "
                         f"{impl!r} and {sweep!r}")
    check_size("block_size", block_size)
    check_size("chunk_rows", chunk_rows)
    if impl == "auto":
        impl = "chunked" if 4 * int(rows) * int(scored) > AUTO_CHUNKED_LOGIT_BYTES else "reference"
    if impl == "reference":
        return StepPlan("reference")
    chunk = 0
    if rows and (sweep == "rows" or (sweep == "auto" and compiled)):
        chunk = min(chunk_rows, rows) if chunk_rows else row_chunk_size(
            rows, scored, device, minimum=sweep == "auto")
    return StepPlan("chunked", chunk, block_size or default_block_size(rows, device),
                    bool(compiled))
