"""Synthetic identity sets in the InsightFace layout, with verification pairs of held-out identities.

``generate_synthetic`` renders ``num_identities`` training identities (in families of look-alikes)
into ``train.rec`` / ``train.idx`` / ``property``, and ``num_pairs`` verification pairs of
``num_heldout_identities`` other identities (other families) into ``heldout.bin``: half positive
pairs (two pictures of one identity), half negative pairs, most of them two members of one family
(hard negatives). Rendering is spread over worker processes; the output depends only on the
arguments (not on the number of workers).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..eval.bin_format import write_bin
from .parallel import imap_ordered
from .recordio import IRHeader, RecordIOWriter, pack
from .synthetic_faces import SIZE, render_jpeg, sample_identities

__all__ = ["generate_synthetic", "plan_pairs"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Seed streams: one word after the user's seed keeps the streams independent.
_STREAM_TRAIN_IDS, _STREAM_HELDOUT_IDS, _STREAM_TRAIN_IMG, _STREAM_PAIR_IMG, _STREAM_PAIRS = range(5)


def plan_pairs(
    num_pairs: int,
    num_identities: int,
    family_size: int,
    rng: np.random.Generator,
    same_family_fraction: float = 0.8,
) -> List[Tuple[int, int, bool]]:
    """``(identity_a, identity_b, issame)`` for ``num_pairs`` pairs, in shuffled order.

    Identities ``f * family_size .. (f + 1) * family_size - 1`` form family ``f``. Half the pairs
    (rounded down) are negative; of those, ``same_family_fraction`` join two members of one
    family when families have at least two members, the rest two identities of different
    families.
    """
    if num_identities < 2:
        raise ValueError("verification pairs need at least 2 held-out identities")
    num_neg = num_pairs // 2
    num_pos = num_pairs - num_neg
    pairs = [(int(i), int(i), True) for i in rng.integers(0, num_identities, size=num_pos)]
    num_families = -(-num_identities // family_size)
    for _ in range(num_neg):
        if family_size > 1 and rng.random() < same_family_fraction:
            f = int(rng.integers(0, num_families))
            members = np.arange(f * family_size, min((f + 1) * family_size, num_identities))
            if members.size >= 2:
                a, b = rng.choice(members, size=2, replace=False)
                pairs.append((int(a), int(b), False))
                continue
        while True:
            a, b = (int(x) for x in rng.integers(0, num_identities, size=2))
            if a // family_size != b // family_size or (a != b and num_families == 1):
                break
        pairs.append((a, b, False))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def _render_chunk(task):
    """Worker: render a list of (identity params, seed words) to JPEG bytes."""
    items, jitter = task
    return [render_jpeg(params, words, jitter) for params, words in items]


def _chunks(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _render_iter(jobs, jitter, workers, desc, progress, chunk=32):
    """Render ``jobs`` [(params, seed words)] across ``workers`` processes; yields JPEG bytes in
    job order as they complete (so large sets are written without being held in memory)."""
    tasks = [(c, jitter) for c in _chunks(jobs, chunk)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="img", leave=False, disable=None)  # None: no bar off a terminal
    results = imap_ordered(_render_chunk, tasks, workers)
    try:
        for batch in results:
            yield from batch
            if bar is not None:
                bar.update(len(batch))
    finally:
        results.close()  # ends the worker pool
        if bar is not None:
            bar.close()


def generate_synthetic(
    out_dir: PathLike,
    num_identities: int = 300,
    images_per_identity: int = 30,
    family_size: int = 4,
    num_heldout_identities: int = 120,
    num_pairs: int = 1200,
    seed: int = 0,
    workers: Optional[int] = None,
    jitter: float = 0.5,
    family_spread: float = 0.5,
    same_family_negatives: float = 0.8,
    progress: bool = True,
) -> Dict:
    """Generate a synthetic face-identity set in ``out_dir``.

    Writes ``train.rec``, ``train.idx``, ``property`` (InsightFace layout: header record 0,
    images as keys 1..N with scalar labels, one range record per identity), ``heldout.bin``
    (verification pairs of held-out identities) and ``synthetic.json`` (this summary).

    Args:
        num_identities: training identities (classes).
        images_per_identity: pictures rendered per training identity.
        family_size: identities per family of look-alikes (1: no families).
        num_heldout_identities: identities used only in the verification pairs.
        num_pairs: verification pairs (half positive, half negative).
        seed: everything is a deterministic function of the arguments.
        workers: rendering processes (default: the CPUs available, at most 8).
        jitter: strength of the per-image variation (pose, light, expression, blur, noise,
            occluders, JPEG quality); 0 renders clean frontal pictures. The default 0.5 with
            family_spread 0.5 is tuned for the CPU demo (see bench/RESULTS.md): a tiny CNN
            trained for 200 steps reaches about 0.78 held-out accuracy from about 0.67 at step 0;
            jitter 1.0 with family_spread 0.35 is harder (about 0.61 after 200 steps).
        family_spread: how far family members lie apart, as a fraction of the population spread
            (small: near twins; 1: unrelated).
        same_family_negatives: fraction of negative pairs drawn within a family.

    Returns a summary dict (paths, counts, timings).
    """
    if num_identities < 1 or images_per_identity < 1:
        raise ValueError("num_identities and images_per_identity must be >= 1")
    if family_size < 1:
        raise ValueError("family_size must be >= 1")
    if num_pairs > 0 and num_heldout_identities < 2:
        raise ValueError("num_pairs > 0 needs num_heldout_identities >= 2")
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    train_ids = sample_identities(
        -(-num_identities // family_size), family_size, np.random.default_rng([seed, _STREAM_TRAIN_IDS]),
        family_spread=family_spread,
    )[:num_identities]
    jobs = [
        (train_ids[i], (seed, _STREAM_TRAIN_IMG, i, k))
        for i in range(num_identities)
        for k in range(images_per_identity)
    ]
    images = _render_iter(jobs, jitter, workers, "rendering identities", progress)
    num_images = len(jobs)
    first_identity_key = num_images + 1
    rec_path, idx_path = out / "train.rec", out / "train.idx"
    with RecordIOWriter(rec_path, idx_path) as writer:
        writer.write(0, pack(IRHeader(0, [first_identity_key, first_identity_key + num_identities], 0, 0), b""))
        for n, jpeg in enumerate(images):
            key = n + 1
            writer.write(key, pack(IRHeader(0, float(n // images_per_identity), key, 0), jpeg))
        for i in range(num_identities):
            start_key = 1 + i * images_per_identity
            writer.write(
                first_identity_key + i,
                pack(IRHeader(0, [start_key, start_key + images_per_identity], first_identity_key + i, 0), b""),
            )
    (out / "property").write_text(f"{num_identities},{SIZE},{SIZE}\n")
    train_seconds = time.perf_counter() - start

    bins = []
    pair_summary = {}
    if num_pairs > 0:
        held_ids = sample_identities(
            -(-num_heldout_identities // family_size), family_size,
            np.random.default_rng([seed, _STREAM_HELDOUT_IDS]), family_spread=family_spread,
        )[:num_heldout_identities]
        pairs = plan_pairs(num_pairs, num_heldout_identities, family_size,
                           np.random.default_rng([seed, _STREAM_PAIRS]), same_family_negatives)
        pair_jobs = []
        for p, (a, b, _) in enumerate(pairs):
            pair_jobs.append((held_ids[a], (seed, _STREAM_PAIR_IMG, p, 0)))
            pair_jobs.append((held_ids[b], (seed, _STREAM_PAIR_IMG, p, 1)))
        pair_images = list(_render_iter(pair_jobs, jitter, workers, "rendering pairs", progress))
        bin_path = write_bin(out / "heldout.bin", pair_images, [s for _, _, s in pairs])
        bins.append(str(bin_path))
        same_family = sum(1 for a, b, s in pairs if not s and a // family_size == b // family_size)
        pair_summary = {
            "num_pairs": len(pairs),
            "positive_pairs": sum(1 for *_, s in pairs if s),
            "negative_pairs_same_family": same_family,
        }

    seconds = time.perf_counter() - start
    total_images = num_images + 2 * pair_summary.get("num_pairs", 0)
    summary = {
        "out_dir": str(out),
        "rec": str(rec_path),
        "idx": str(idx_path),
        "property": str(out / "property"),
        "bins": bins,
        "num_classes": num_identities,
        "num_images": num_images,
        "images_per_identity": images_per_identity,
        "family_size": family_size,
        "num_heldout_identities": num_heldout_identities if num_pairs > 0 else 0,
        **pair_summary,
        "seed": seed,
        "jitter": jitter,
        "family_spread": family_spread,
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_second": round(total_images / seconds, 1) if seconds > 0 else None,
        "train_images_per_second": round(num_images / train_seconds, 1) if train_seconds > 0 else None,
    }
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
