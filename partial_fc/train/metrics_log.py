"""Rank-0 logging of training records: TensorBoard, metrics.jsonl and a progress bar."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict

import torch

from ..outputs import writing


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records of steps after ``last_step`` (they will be re-run after a resume), atomically."""
    if not path.exists():
        return
    kept = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if int(record.get("step", -1)) <= last_step:
                kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricLogger:
    """Writes scalar records to TensorBoard and ``metrics.jsonl`` (one JSON object per line with
    ``step``); a no-op on ranks other than 0. A log that cannot be written (a file where its
    folder must be, a full disk) raises OutputError naming it."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        with writing(self.path, "the metrics log"):
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, resume_step)
            self.jsonl = open(self.path, "a", buffering=1)
        with writing(run_dir / "tensorboard", "the TensorBoard log"):
            # purge_step hides events of steps that a resumed run repeats.
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, step: int, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {}
        for key, value in record.items():
            value = float(value)
            clean[key] = value if math.isfinite(value) else str(value)
            self.writer.add_scalar(key, value, step)
        with writing(self.path, "the metrics log"):
            self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        """A TensorBoard histogram of the finite ``values`` (none: nothing is written; a skipped
        step's NaNs would make TensorBoard's histogram raise)."""
        if not self.enabled:
            return
        values = values.detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        if values.numel():
            self.writer.add_histogram(name, values, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
