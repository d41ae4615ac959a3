"""1:1 verification on insightface `.bin` pair sets, reusable from the training loop.

    sets = [load_verification_set(p) for p in ["lfw.bin", "cfp_fp.bin"]]   # decode once
    results = evaluate_bins(model, sets, batch_size=256)                  # call every N steps
    results["lfw"]["acc"], results["lfw"]["std"]
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import metrics
from .bin_format import load_bin
from .embedding import embed_images, to_chw_tensor

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True, eq=False)
class VerificationSet:
    """A decoded `.bin`: `images` uint8 2N x 3 x H x W (pair i = rows 2i, 2i+1), `issame` N bools."""

    name: str
    images: torch.Tensor
    issame: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.issame.shape[0])


def load_verification_set(path: PathLike, image_size: Optional[Tuple[int, int]] = (112, 112),
                          name: Optional[str] = None, progress: bool = True,
                          folds: Optional[int] = None) -> VerificationSet:
    """Decode a `.bin` into a `VerificationSet` named after the file (lfw.bin -> "lfw"); with
    `folds`, a set of fewer pairs than that protocol scores raises ValueError naming the file."""
    path = Path(path)
    images, issame = load_bin(path, image_size=image_size, progress=progress)
    if folds is not None:
        check_folds(path, issame.shape[0], folds)
    return VerificationSet(name or path.stem, to_chw_tensor(images), issame)


def check_folds(source, num_pairs: int, folds: int) -> None:
    """A set of `num_pairs` pairs can be scored by the `folds`-fold protocol, else ValueError
    naming `source`."""
    if not 2 <= folds <= num_pairs:
        raise ValueError(f"{source}: {num_pairs} pairs cannot be scored by the {folds}-fold protocol "
                         f"(it needs 2 <= folds <= pairs)")


@functools.lru_cache(maxsize=16)
def _cached_set(path: str, mtime_ns: int, size: int,
                image_size: Optional[Tuple[int, int]]) -> VerificationSet:
    return load_verification_set(path, image_size=image_size)


def _as_set(source: Union[PathLike, VerificationSet],
            image_size: Optional[Tuple[int, int]]) -> VerificationSet:
    if isinstance(source, VerificationSet):
        return source
    path = Path(source).resolve()
    stat = path.stat()  # the cache key includes mtime and size: a rewritten file is re-read
    return _cached_set(str(path), stat.st_mtime_ns, stat.st_size,
                       tuple(image_size) if image_size is not None else None)


def clear_cache() -> None:
    """Forget the sets that `evaluate_bins` decoded from paths."""
    _cached_set.cache_clear()


def evaluate_pairs(embeddings: np.ndarray, issame: np.ndarray, folds: int = metrics.FOLDS,
                   fars: Sequence[float] = metrics.DEFAULT_FARS) -> Dict[str, object]:
    """Metrics of one pair set from L2-normalised embeddings in pair order (rows 2i, 2i+1).

    ``tar_at_far`` holds None for a FAR the set cannot resolve (fewer than 1/FAR negative
    pairs: :func:`metrics.far_resolvable`). Embeddings holding NaN/inf (a diverged model) give
    no metrics but ``{"failed": reason, "num_nonfinite": rows, "num_pairs"}``: a failed set,
    not a traceback from inside scikit-learn."""
    finite = np.isfinite(np.asarray(embeddings)).all(axis=1)
    if not finite.all():
        bad = int((~finite).sum())
        return {"failed": f"{bad} of {finite.size} embeddings are non-finite (NaN/inf): the model has "
                          "diverged", "num_nonfinite": bad, "num_pairs": int(issame.shape[0])}
    e1, e2 = embeddings[0::2], embeddings[1::2]
    acc, std = metrics.lfw_accuracy(e1, e2, issame, folds=folds)
    scores = np.sum(np.asarray(e1, np.float64) * np.asarray(e2, np.float64), axis=1)
    result: Dict[str, object] = {"acc": acc, "std": std, "num_pairs": int(issame.shape[0])}
    if issame.any() and not issame.all():
        tars = metrics.tar_at_far(scores, issame, fars)
        negatives = int((~np.asarray(issame, bool)).sum())
        result["tar_at_far"] = {metrics.far_key(f): t if metrics.far_resolvable(f, negatives) else None
                                for f, t in tars.items()}
    result["scores"] = scores
    return result


def evaluate_bins(model: nn.Module,
                  bin_paths_or_loaded: Iterable[Union[PathLike, VerificationSet]],
                  batch_size: int = 128, device: Optional[Union[str, torch.device]] = None,
                  flip: bool = True, folds: int = metrics.FOLDS,
                  image_size: Optional[Tuple[int, int]] = (112, 112),
                  autocast_dtype: Optional[torch.dtype] = None,
                  keep_scores: bool = False, progress: bool = False) -> Dict[str, Dict[str, object]]:
    """Verification accuracy of `model` on each set: `{name: {"acc", "std", "xnorm", ...}}`.

    Sets are `.bin` paths (decoded once per process and cached, keyed by path, mtime and size)
    or `VerificationSet`s. Embeddings are flip-fused (emb(img) + emb(mirror(img))) and
    L2-normalised; the model runs in eval mode under no_grad and gets its previous mode back.
    Each entry holds "acc", "std" (k-fold protocol), "xnorm" (mean norm of the raw embeddings
    of the images and their mirrors, insightface's XNorm), "num_pairs", "tar_at_far"
    ({"1e-06": tar or None where the set has too few negative pairs, ...} from the pair
    cosines) and with `keep_scores` the pair cosines and labels ("scores", "issame") for ROC
    plots; or, where embeddings are non-finite, "failed", "num_nonfinite", "num_pairs" and
    "xnorm" (see `evaluate_pairs`).
    """
    results: Dict[str, Dict[str, object]] = {}
    for source in bin_paths_or_loaded:
        vset = _as_set(source, image_size)
        if vset.name in results:
            raise ValueError(f"two verification sets are named {vset.name!r}")
        check_folds(source if not isinstance(source, VerificationSet) else vset.name, vset.num_pairs, folds)
        emb, norms = embed_images(model, vset.images, batch_size=batch_size, device=device,
                                  flip=flip, autocast_dtype=autocast_dtype, progress=progress,
                                  desc=f"embedding {vset.name}")
        result = evaluate_pairs(emb, vset.issame, folds=folds)
        result["xnorm"] = float(np.mean(norms))
        if keep_scores:
            result["issame"] = vset.issame
        else:
            result.pop("scores", None)
        results[vset.name] = result
    return results
