"""Validation during training: flip-fused 1:1 verification on the ``data.val_bins`` sets."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..classifier.collectives import all_gather_rows

log = logging.getLogger(__name__)

# The TAR@FAR operating points logged (the verification report's keys for FAR 1e-3 and 1e-4).
LOGGED_FARS = ("1e-03", "1e-04", "0.001", "0.0001")


class Validator:
    """Scores a backbone on verification sets (``partial_fc.eval.verification.VerificationSet``).

    Each rank embeds a slice of every set's images and the slices are all-gathered, so no rank
    idles on a collective while another evaluates; every rank of ``group`` must call :meth:`run`.

    Args:
        val_sets: the decoded sets; none: :meth:`should_run` is always False.
        every: validate every this many steps (0: only at step 0 and at ``end``).
        end: the last step of this run.
        batch_size: images per forward pass.
    """

    def __init__(self, val_sets: Sequence, every: int, end: int, batch_size: int, device: torch.device,
                 group=None, rank: int = 0, world_size: int = 1,
                 autocast_dtype: Optional[torch.dtype] = None):
        self.val_sets = list(val_sets)
        self.every, self.end, self.batch_size = every, end, batch_size
        self.device, self.group, self.rank, self.world_size = device, group, rank, world_size
        self.autocast_dtype = autocast_dtype

    def should_run(self, step: int) -> bool:
        """Whether to validate after ``step`` (step 0: before training)."""
        if not self.val_sets:
            return False
        return step in (0, self.end) or bool(self.every and step % self.every == 0)

    def run(self, backbone: nn.Module, step: int) -> Dict[str, float]:
        """``{"val/<set>/acc": ..., "val/<set>/std": ..., "val/<set>/tar@far=<far>": ...}``
        (``val/<set>/nonfinite``: the count of non-finite embeddings, when a set failed)."""
        from ..eval.embedding import embed_images
        from ..eval.verification import evaluate_pairs

        results = {}
        for vset in self.val_sets:
            n = vset.images.shape[0]
            lo = n * self.rank // self.world_size
            hi = n * (self.rank + 1) // self.world_size
            emb, _ = embed_images(backbone, vset.images[lo:hi], batch_size=self.batch_size,
                                  device=self.device, autocast_dtype=self.autocast_dtype)
            emb = torch.from_numpy(emb).to(self.device)
            if self.group is not None:
                emb = all_gather_rows(emb, group=self.group)
            metrics = evaluate_pairs(emb.cpu().numpy(), vset.issame)
            if "failed" in metrics:  # training goes on; the state check says whether it can
                results[f"val/{vset.name}/nonfinite"] = float(metrics["num_nonfinite"])
                if self.rank == 0:
                    log.warning("step %d: validation on %s failed: %s", step, vset.name, metrics["failed"])
                continue
            results[f"val/{vset.name}/acc"] = float(metrics["acc"])
            results[f"val/{vset.name}/std"] = float(metrics["std"])
            for far, tar in metrics.get("tar_at_far", {}).items():
                if tar is not None and far in LOGGED_FARS:
                    results[f"val/{vset.name}/tar@far={far}"] = float(tar)
        return results
