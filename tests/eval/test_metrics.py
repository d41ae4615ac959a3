"""Verification metrics against independent float64 implementations of the published protocols."""
import math

import numpy as np
import pytest

from partial_fc.eval import metrics


# ---- independent references: plain Python floats (float64), no vectorisation -----------------

def _ref_lfw_accuracy(emb1, emb2, issame, folds=10):
    def unit(v):
        n = math.sqrt(sum(float(a) * float(a) for a in v))
        return [float(a) / n for a in v]

    dist = []
    for a, b in zip(emb1, emb2):
        ua, ub = unit(a), unit(b)
        dist.append(sum((x - y) ** 2 for x, y in zip(ua, ub)))
    n = len(dist)
    thresholds = [k * 0.01 for k in range(400)]  # 0 .. 3.99
    base, extra = divmod(n, folds)
    bounds, start = [], 0
    for f in range(folds):
        size = base + (1 if f < extra else 0)
        bounds.append((start, start + size))
        start += size

    def accuracy(idx, thr):
        return sum((dist[i] < thr) == bool(issame[i]) for i in idx) / len(idx)

    accs = []
    for lo, hi in bounds:
        train = [i for i in range(n) if not lo <= i < hi]
        best_thr, best_acc = None, -1.0
        for thr in thresholds:
            acc = accuracy(train, thr)
            if acc > best_acc:  # strict: the first best threshold wins
                best_thr, best_acc = thr, acc
        accs.append(accuracy(range(lo, hi), best_thr))
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return mean, std


def _ref_roc(scores, labels):
    """ROC points as sklearn's roc_curve(drop_intermediate=True) defines them, by hand."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tps, fps, thr = [], [], []
    tp = fp = 0
    for rank, i in enumerate(order):
        tp += bool(labels[i])
        fp += not bool(labels[i])
        last_of_score = rank == len(order) - 1 or scores[order[rank + 1]] != scores[i]
        if last_of_score:
            tps.append(tp)
            fps.append(fp)
            thr.append(scores[i])
    # drop points collinear with both neighbours (second differences of fps and tps both zero)
    keep = [0]
    for k in range(1, len(tps) - 1):
        if (fps[k + 1] - 2 * fps[k] + fps[k - 1]) != 0 or (tps[k + 1] - 2 * tps[k] + tps[k - 1]) != 0:
            keep.append(k)
    if len(tps) > 1:
        keep.append(len(tps) - 1)
    tps = [0] + [tps[k] for k in keep]
    fps = [0] + [fps[k] for k in keep]
    return [f / fps[-1] for f in fps], [t / tps[-1] for t in tps]


def _ref_tar_at_far(scores, labels, fars):
    fpr, tpr = _ref_roc([float(s) for s in scores], list(labels))
    fpr, tpr = fpr[::-1], tpr[::-1]
    out = {}
    for far in fars:
        best = min(range(len(fpr)), key=lambda i: (abs(fpr[i] - far), i))
        out[far] = tpr[best]
    return out


# ---- tests ----------------------------------------------------------------------------------

def _random_pairs(rng, n, dim=16, noise=1.0, dtype=np.float32):
    issame = rng.random(n) < 0.5
    e1 = rng.standard_normal((n, dim))
    e2 = np.where(issame[:, None], e1 + noise * rng.standard_normal((n, dim)),
                  rng.standard_normal((n, dim)))
    return e1.astype(dtype), e2.astype(dtype), issame


@pytest.mark.parametrize("n,folds,seed", [(600, 10, 0), (613, 10, 1), (57, 10, 2), (101, 7, 3)])
def test_lfw_accuracy_matches_reference(n, folds, seed):
    rng = np.random.default_rng(seed)
    e1, e2, issame = _random_pairs(rng, n)
    mean, std = metrics.lfw_accuracy(e1, e2, issame, folds=folds)
    ref_mean, ref_std = _ref_lfw_accuracy(e1, e2, issame, folds=folds)
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)
    assert 0.5 < mean < 1.0  # the random pairs are neither trivial nor hopeless


def test_lfw_accuracy_with_tied_distances_and_unnormalised_input():
    rng = np.random.default_rng(4)
    # Few distinct embeddings reused many times: many pairs share exactly the same distance.
    atoms = rng.standard_normal((6, 8))
    i1, i2 = rng.integers(0, 6, 233), rng.integers(0, 6, 233)
    issame = (i1 == i2) | (rng.random(233) < 0.2)
    e1, e2 = atoms[i1] * rng.uniform(0.5, 3.0, (233, 1)), atoms[i2]
    assert metrics.lfw_accuracy(e1, e2, issame) == pytest.approx(
        _ref_lfw_accuracy(e1, e2, issame), abs=1e-12)


def test_fold_slices_match_sklearn_kfold():
    from sklearn.model_selection import KFold

    for n in (10, 57, 600, 613):
        ours = [np.arange(n)[s] for s in metrics.fold_slices(n, 10)]
        theirs = [test for _, test in KFold(n_splits=10, shuffle=False).split(np.zeros(n))]
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_perfectly_separated_pairs_are_all_correct():
    rng = np.random.default_rng(5)
    e1 = rng.standard_normal((50, 4))
    e2 = e1.copy()
    e2[25:] = -e1[25:]  # distance 0 for genuine, 4 for impostor pairs
    issame = np.arange(50) < 25
    assert metrics.lfw_accuracy(e1, e2, issame) == (1.0, 0.0)


@pytest.mark.parametrize("seed,n,decimals", [(0, 5000, None), (1, 3001, 2), (2, 20000, 1)])
def test_tar_at_far_matches_reference(seed, n, decimals):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.standard_normal(n) + 1.5 * labels
    if decimals is not None:  # coarse scores: many ties
        scores = np.round(scores, decimals)
    ours = metrics.tar_at_far(scores, labels)
    ref = _ref_tar_at_far(scores, labels, metrics.DEFAULT_FARS)
    assert list(ours) == list(metrics.DEFAULT_FARS)
    for far in metrics.DEFAULT_FARS:
        assert ours[far] == pytest.approx(ref[far], abs=1e-15), far
    assert 0 < ours[0.1] < 1


def test_reference_roc_agrees_with_sklearn():
    # Guards the reference itself: its ROC must be sklearn's, point for point.
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(6)
    labels = rng.random(2000) < 0.4
    scores = np.round(rng.standard_normal(2000) + labels, 1)
    fpr, tpr, _ = roc_curve(labels, scores)
    rfpr, rtpr = _ref_roc(list(scores), list(labels))
    np.testing.assert_allclose(fpr, rfpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, rtpr, rtol=0, atol=1e-15)


def test_tar_at_far_custom_targets_and_errors():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    assert metrics.tar_at_far(scores, labels, fars=(0.0, 1 / 3, 1.0)) == \
        _ref_tar_at_far(scores, labels, (0.0, 1 / 3, 1.0))
    with pytest.raises(ValueError, match="both genuine"):
        metrics.tar_at_far(scores, np.ones(6, dtype=bool))
    with pytest.raises(ValueError):
        metrics.lfw_accuracy(np.zeros((3, 2)), np.zeros((4, 2)), [True] * 3)


def test_far_keys():
    assert [metrics.far_key(f) for f in metrics.DEFAULT_FARS] == \
        ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
