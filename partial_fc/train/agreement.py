"""Ranks of one job check, right after the process group forms, that they run the same job.

Every node composes its own config (its own command line, Hydra defaults, environment) and opens
its own copy of the dataset; a node that differs (``head.s=32`` on one node, another package
revision, another dataset version) would otherwise train something inconsistent or hang in a
collective whose shapes differ. Each rank hashes a canonical record of what must be equal; one
all-gather of 32-byte digests compares them, and only on a mismatch are the full records gathered
to name the keys, the ranks and the values. Every rank raises the same
:class:`RankDisagreementError`.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

# Config keys that may legitimately differ between nodes: where outputs and data lie on each
# node's disk, its devices, CPU threads and loader workers, and its interactive display.
PER_NODE_KEYS = (
    "output_root",
    "run_name",
    "data.root",
    "data.cache_dir",
    "data.num_workers",
    "trainer.device",
    "trainer.threads",
    "trainer.stop_file",
    "trainer.progress_bar",
)
_SHOWN_KEYS = 8  # differing keys spelled out in one error


class RankDisagreementError(RuntimeError):
    """Ranks of one job differ in a value that must be equal; the message names key, ranks, values."""


def _flatten(value, prefix: str, out: Dict[str, str]) -> None:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = json.dumps(_canonical(value), sort_keys=True, default=str)


def _canonical(value):
    """Numbers compare by value: ``head.s=64`` on one node equals ``s: 64.0`` in another's YAML."""
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_record(cfg: DictConfig, per_node_keys: Sequence[str] = PER_NODE_KEYS) -> Dict[str, str]:
    """The resolved config as ``{"head.s": "64.0", ...}`` (JSON-encoded leaves, lists whole),
    without ``per_node_keys`` and anything below them. Raises what resolution raises."""
    flat: Dict[str, str] = {}
    _flatten(OmegaConf.to_container(cfg, resolve=True), "", flat)
    skip = tuple(per_node_keys)
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in skip)}


def git_revision(start: Optional[Path] = None) -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout holding this package, or None (no git, an installed wheel)."""
    start = Path(__file__).resolve().parents[2] if start is None else start
    if not (start / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(start), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def code_record() -> Dict[str, str]:
    """Package version, git revision (when known) and torch version of this process."""
    from importlib import metadata

    try:
        version = metadata.version("partial-fc-npc")
    except metadata.PackageNotFoundError:
        version = "not installed"
    return {"code.version": version, "code.git_revision": git_revision() or "unknown",
            "code.torch": torch.__version__}


def dataset_record(dataset, num_classes: int) -> Dict[str, str]:
    """What identifies the dataset a rank opened: class count, record count, layout and, for
    RecordIO, the size of the ``.rec`` file (header and records, in bytes)."""
    record = {"dataset.num_classes": str(int(num_classes)), "dataset.records": str(len(dataset))}
    layout = getattr(dataset, "layout", None)
    if layout is not None:
        record["dataset.layout"] = str(layout)
    reader = getattr(dataset, "reader", None)
    rec_path = getattr(reader, "rec_path", None)
    if rec_path is not None:
        record["dataset.rec_bytes"] = str(Path(rec_path).stat().st_size)
    return record


def digest(record: Mapping[str, str]) -> bytes:
    """SHA-256 of the record's canonical JSON (32 bytes)."""
    return hashlib.sha256(json.dumps(dict(record), sort_keys=True).encode()).digest()


def rank_spans(ranks: List[int]) -> str:
    """``[0, 1, 2, 3, 6]`` -> ``ranks 0-3, 6``; one rank -> ``rank 5``."""
    spans, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            spans.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def describe_differences(records: Sequence[Mapping[str, str]]) -> List[str]:
    """One line per key whose value is not the same on every rank (``records[r]`` is rank r's),
    e.g. ``head.s differs: ranks 0-3 have 64, ranks 4-7 have 32`` (integral numbers as integers); a key a rank lacks shows
    as ``<absent>``. Keys sorted; empty when all agree."""
    keys = sorted(set().union(*records))
    lines = []
    for key in keys:
        by_value: Dict[str, List[int]] = {}
        for rank, record in enumerate(records):
            by_value.setdefault(record.get(key, "<absent>"), []).append(rank)
        if len(by_value) > 1:
            parts = sorted(by_value.items(), key=lambda kv: kv[1][0])
            lines.append(f"{key} differs: " + ", ".join(f"{rank_spans(r)} {'has' if len(r) == 1 else 'have'} {v}" for v, r in parts))
    return lines


def check_ranks_agree(record: Mapping[str, str], rank: int, world_size: int, group=None,
                      device: Optional[torch.device] = None) -> None:
    """Collective over ``group``: raise :class:`RankDisagreementError` on every rank unless all
    ranks passed an equal ``record``. Costs one all-gather of 32 bytes per rank when they agree."""
    if world_size <= 1:
        return
    device = torch.device("cpu") if device is None else device
    mine = torch.tensor(list(digest(record)), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    records: List[Optional[Mapping[str, str]]] = [None] * world_size
    dist.all_gather_object(records, dict(record), group=group)
    lines = describe_differences(records)
    shown = lines[:_SHOWN_KEYS] + ([f"... and {len(lines) - _SHOWN_KEYS} more"] if len(lines) > _SHOWN_KEYS else [])
    raise RankDisagreementError(
        f"rank {rank}/{world_size}: the ranks of this job do not agree ({len(lines)} key(s)); every node "
        f"must be started with the same config, code and dataset:\n  " + "\n  ".join(shown))
