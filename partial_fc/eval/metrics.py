"""Verification metrics with the conventions of the published face-recognition tables.

- `lfw_accuracy`: the LFW / CFP / AgeDB protocol of insightface. Squared L2 distance between
  L2-normalised embeddings; 10 contiguous folds without shuffling (the first `n % folds` folds one
  pair longer, as sklearn's KFold splits); thresholds 0, 0.01, ..., 3.99 (`np.arange(0, 4, 0.01)`);
  a pair is predicted "same" when its distance is strictly below the threshold; on each fold the
  first threshold with the best accuracy on the other nine is applied to it; mean and (population)
  std of the ten fold accuracies.
- `tar_at_far`: the IJB-B/C 1:1 protocol. ROC from `sklearn.metrics.roc_curve` (intermediate
  points dropped), reversed; for each target FAR the point whose FAR is nearest (ties: the first
  in reversed order) gives the TAR.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
LFW_THRESHOLDS = np.arange(0, 4, 0.01)


def _as_pairs(emb1, emb2, issame) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    e1 = np.asarray(emb1, dtype=np.float64)
    e2 = np.asarray(emb2, dtype=np.float64)
    same = np.asarray(issame).astype(bool).reshape(-1)
    if e1.ndim != 2 or e1.shape != e2.shape or e1.shape[0] != same.shape[0]:
        raise ValueError(f"expected two N x D embedding arrays and N labels, got {e1.shape}, "
                         f"{e2.shape} and {same.shape[0]} labels")
    return e1, e2, same


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float64).tiny)


def pair_distances(emb1, emb2) -> np.ndarray:
    """Squared L2 distance between the L2-normalised rows of `emb1` and `emb2` (float64)."""
    diff = l2_normalize(emb1) - l2_normalize(emb2)
    return np.sum(diff * diff, axis=1)


FOLDS = 10  # the verification protocol's folds (insightface, LFW)


def fold_slices(n: int, folds: int) -> Sequence[slice]:
    """Contiguous folds of n items; the first `n % folds` get one extra (sklearn KFold)."""
    if folds < 2 or folds > n:
        raise ValueError(f"need 2 <= folds <= number of pairs, got folds={folds}, pairs={n}")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def _correct_counts(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For every threshold, how many pairs `dist < threshold` classifies correctly."""
    pos = np.sort(dist[same])
    neg = np.sort(dist[~same])
    tp = np.searchsorted(pos, thresholds, side="left")  # positives strictly below threshold
    fp = np.searchsorted(neg, thresholds, side="left")
    return tp + (neg.size - fp)


def lfw_accuracy(emb1, emb2, issame, folds: int = FOLDS,
                 thresholds: np.ndarray = LFW_THRESHOLDS) -> Tuple[float, float]:
    """Mean and std of the k-fold verification accuracy (see the module docstring).

    `emb1[i]`, `emb2[i]` are the embeddings of pair i (any scale: they are L2-normalised here);
    `issame[i]` says whether the pair shows one identity.
    """
    e1, e2, same = _as_pairs(emb1, emb2, issame)
    dist = pair_distances(e1, e2)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n = dist.shape[0]
    accuracies = []
    for test in fold_slices(n, folds):
        train = np.ones(n, dtype=bool)
        train[test] = False
        best = int(np.argmax(_correct_counts(dist[train], same[train], thresholds)))
        correct = _correct_counts(dist[test], same[test], thresholds[best:best + 1])[0]
        accuracies.append(correct / (test.stop - test.start))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def roc(scores, labels) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of `sklearn.metrics.roc_curve`; higher score = more likely same."""
    from sklearn.metrics import roc_curve

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(bool).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    if labels.all() or not labels.any():
        raise ValueError("a ROC needs both genuine (True) and impostor (False) pairs")
    return roc_curve(labels, scores)


def tar_at_far(scores, labels, fars: Iterable[float] = DEFAULT_FARS) -> Dict[float, float]:
    """TAR at each target FAR, `{far: tar}`, by the IJB 1:1 convention (module docstring)."""
    fpr, tpr, _ = roc(scores, labels)
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {float(far): float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}


def far_resolvable(far: float, num_negatives: int) -> bool:
    """Whether ``num_negatives`` impostor pairs can measure a FAR of ``far``: at least 1/far of
    them (one false accept is then at most ``far``); below that every such TAR is one repeated,
    meaningless value."""
    return num_negatives * float(far) >= 1.0 - 1e-9


def far_key(far: float) -> str:
    """The JSON key of a target FAR: Python's shortest repr, e.g. '1e-06', '0.001', '0.1'."""
    return repr(float(far))
