"""Writes checkpoints in a loop until killed (used by the kill-during-write test)."""
import sys
from pathlib import Path

import torch

from partial_fc.train.checkpoint import CheckpointWriter

if __name__ == "__main__":
    root = Path(sys.argv[1])
    writer = CheckpointWriter(root, rank=0, world_size=1, keep=2)
    step = 0
    while True:
        step += 1
        big = torch.full((2_000_000,), float(step))  # 8 MB per file: writes take a while
        writer.save(step, {"step": step, "payload": big}, {"rows": {"weight": big.view(-1, 4)}},
                    {"num_classes": 500_000}, backbone_writer=lambda p: torch.save({"b": big}, p))
        print(step, flush=True)
