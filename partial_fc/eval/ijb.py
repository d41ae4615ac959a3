"""IJB-B / IJB-C 1:1 template verification from the standard release layout.

    <root>/meta/<prefix>_face_tid_mid.txt        "<image> <template id> <media id>" per face
    <root>/meta/<prefix>_template_pair_label.txt "<template 1> <template 2> <0|1>" per pair
    <root>/meta/<prefix>_name_5pts_score.txt     "<image> x1 y1 ... x5 y5 <face score>" per face
    <root>/loose_crop/<image>

with prefix "ijbc" or "ijbb". The protocol follows insightface's evaluation: each face aligned
to the 112x112 ArcFace template from its 5 points; embedding of the crop plus its mirror; optionally
scaled by the detector's face score; averaged within each media (video or still) of a template,
media features summed into the template feature, L2-normalised; the score of a pair is the cosine
of its two templates; ROC and TAR@FAR as in `metrics.tar_at_far`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import metrics
from .alignment import align_face
from .embedding import embed_loader

PathLike = Union[str, os.PathLike]


@dataclass
class IJBMeta:
    """The faces of an IJB release (in file order) and its verification pairs."""

    root: Path
    image_names: Sequence[str]
    templates: np.ndarray  # int64, one per face
    medias: np.ndarray  # int64, one per face
    landmarks: np.ndarray  # float64 N x 5 x 2
    face_scores: np.ndarray  # float64 N
    pairs: np.ndarray  # int64 P x 2 template ids
    labels: np.ndarray  # bool P


def _read_table(path: Path, min_columns: int):
    """Whitespace-separated rows of a metadata file; ``line_numbers`` (same order) for messages."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB metadata file missing: {path}")
    rows, line_numbers = [], []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < min_columns:
                raise ValueError(f"{path}:{line_no}: expected {min_columns} columns, got {len(fields)}")
            rows.append(fields)
            line_numbers.append(line_no)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows, line_numbers


def _parsed(path: Path, rows, line_numbers, columns: slice, cast, what: str) -> np.ndarray:
    """``cast`` of ``row[columns]`` for every row; a field that does not parse raises naming the
    file, its line and the field."""
    out = []
    for row, line_no in zip(rows, line_numbers):
        try:
            out.append([cast(v) for v in row[columns]])
        except ValueError:
            raise ValueError(f"{path}:{line_no}: expected {what}, got {' '.join(row[columns])!r}") from None
    return np.array(out)


def read_ijb_meta(root: PathLike, target: str = "IJBC") -> IJBMeta:
    """Read the three metadata files of an IJB-B (`target="IJBB"`) or IJB-C release at `root`."""
    root = Path(root)
    prefix = target.lower()
    if prefix not in ("ijbb", "ijbc"):
        raise ValueError(f"target must be IJBB or IJBC, got {target!r}")
    meta = root / "meta"
    face_path = meta / f"{prefix}_face_tid_mid.txt"
    pair_path = meta / f"{prefix}_template_pair_label.txt"
    lmk_path = meta / f"{prefix}_name_5pts_score.txt"

    faces, face_lines = _read_table(face_path, 3)
    names = [row[0] for row in faces]
    ids = _parsed(face_path, faces, face_lines, slice(1, 3), int, "integer template and media ids")
    templates, medias = ids[:, 0].astype(np.int64), ids[:, 1].astype(np.int64)

    lmk_rows, lmk_lines = _read_table(lmk_path, 12)
    by_name = {}
    for row, line_no in zip(lmk_rows, lmk_lines):
        if row[0] in by_name:
            raise ValueError(f"{lmk_path}:{line_no}: image {row[0]} appears again (first on line "
                             f"{by_name[row[0]][1]})")
        by_name[row[0]] = (row, line_no)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{lmk_path}: no landmarks for {len(missing)} faces of {face_path.name}, "
                         f"e.g. {missing[0]}")
    values = _parsed(lmk_path, [by_name[n][0] for n in names], [by_name[n][1] for n in names],
                     slice(1, 12), float, "10 landmark coordinates and a score").astype(np.float64)

    pair_rows, pair_lines = _read_table(pair_path, 3)
    fields = _parsed(pair_path, pair_rows, pair_lines, slice(0, 3), int,
                     "two integer template ids and a 0/1 label").astype(np.int64)
    pairs, labels = fields[:, :2], fields[:, 2]
    bad = np.flatnonzero(~np.isin(labels, (0, 1)))
    if bad.size:
        raise ValueError(f"{pair_path}:{pair_lines[bad[0]]}: label must be 0 or 1, got {labels[bad[0]]}")
    unknown = np.setdiff1d(pairs.reshape(-1), templates)
    if unknown.size:
        raise ValueError(f"{pair_path}: template {unknown[0]} has no faces in {face_path.name}")
    return IJBMeta(root, names, templates, medias, values[:, :10].reshape(-1, 5, 2),
                   values[:, 10], pairs, labels.astype(bool))


class AlignedFaces(Dataset):
    """The loose crops of an IJB release, aligned to 112x112; items are uint8 3 x 112 x 112."""

    def __init__(self, meta: IJBMeta, image_dir: str = "loose_crop", size: int = 112):
        self.meta = meta
        self.image_dir = meta.root / image_dir
        self.size = size

    def __len__(self) -> int:
        return len(self.meta.image_names)

    def __getitem__(self, i: int) -> torch.Tensor:
        from partial_fc.data import decode_image

        path = self.image_dir / self.meta.image_names[i]
        try:
            image = decode_image(path.read_bytes())
        except Exception as err:
            raise ValueError(f"cannot read face image {path}: {err}") from err
        crop = align_face(image, self.meta.landmarks[i], self.size)
        return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))


def template_features(image_features: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pool face features into L2-normalised template features.

    Within a template, faces of one media are averaged; the media averages are summed. Returns
    (sorted unique template ids, float32 T x D features).
    """
    feats = np.asarray(image_features)
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted = templates[order], medias[order]
    group_start = np.flatnonzero(np.r_[True, (np.diff(t_sorted) != 0) | (np.diff(m_sorted) != 0)])
    counts = np.diff(np.r_[group_start, order.size])
    media_means = np.add.reduceat(feats[order].astype(np.float64), group_start, axis=0)
    media_means /= counts[:, None]
    group_templates = t_sorted[group_start]
    template_ids, template_start = np.unique(group_templates, return_index=True)
    pooled = np.add.reduceat(media_means, template_start, axis=0)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return template_ids, pooled.astype(np.float32)


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray,
                batch_size: int = 100_000) -> np.ndarray:
    """Cosine score of every template pair, in batches (float64)."""
    index = np.searchsorted(template_ids, pairs)
    if (index >= template_ids.size).any() or (template_ids[np.minimum(index, template_ids.size - 1)]
                                              != pairs).any():
        raise ValueError("a pair names a template without features")
    scores = np.empty(pairs.shape[0], dtype=np.float64)
    for start in range(0, pairs.shape[0], batch_size):
        i = index[start:start + batch_size]
        a = template_feats[i[:, 0]].astype(np.float64)
        b = template_feats[i[:, 1]].astype(np.float64)
        scores[start:start + batch_size] = np.sum(a * b, axis=1)
    return scores


def face_features(model: nn.Module, meta: IJBMeta, batch_size: int = 128,
                  device: Optional[Union[str, torch.device]] = None, num_workers: int = 0,
                  flip: bool = True, autocast_dtype: Optional[torch.dtype] = None,
                  progress: bool = True) -> np.ndarray:
    """Unnormalised (flip-fused) float32 embeddings of every aligned face, in file order."""
    loader = DataLoader(AlignedFaces(meta), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=torch.cuda.is_available())
    return embed_loader(model, loader, device=device, flip=flip, autocast_dtype=autocast_dtype,
                        progress=progress, desc="IJB faces", total=len(loader))


def scores_from_face_features(meta: IJBMeta, features: np.ndarray, normalize_faces: bool = False,
                              face_score_weighting: bool = True) -> np.ndarray:
    """Pair scores from face features: optional per-face L2 normalisation and face-score weighting
    (insightface's defaults keep the norm and weight by the detector score), then pooling."""
    feats = np.asarray(features, dtype=np.float64)
    if normalize_faces:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True),
                                   np.finfo(np.float64).tiny)
    if face_score_weighting:
        feats = feats * meta.face_scores[:, None]
    ids, tfeats = template_features(feats, meta.templates, meta.medias)
    return pair_scores(ids, tfeats, meta.pairs)


def evaluate_ijb(model: nn.Module, root: PathLike, target: str = "IJBC", batch_size: int = 128,
                 device: Optional[Union[str, torch.device]] = None, num_workers: int = 0,
                 flip: bool = True, face_score_weighting: bool = True,
                 normalize_faces: bool = False, fars: Sequence[float] = metrics.DEFAULT_FARS,
                 autocast_dtype: Optional[torch.dtype] = None,
                 progress: bool = True) -> Dict[str, object]:
    """IJB-B/C 1:1 verification of `model`: {"tar_at_far": {"1e-06": tar, ...}, "num_pairs",
    "num_faces", "num_templates", "scores", "labels", "fpr", "tpr"}."""
    meta = read_ijb_meta(root, target)
    feats = face_features(model, meta, batch_size=batch_size, device=device,
                          num_workers=num_workers, flip=flip, autocast_dtype=autocast_dtype,
                          progress=progress)
    scores = scores_from_face_features(meta, feats, normalize_faces=normalize_faces,
                                       face_score_weighting=face_score_weighting)
    fpr, tpr, _ = metrics.roc(scores, meta.labels)
    tars = metrics.tar_at_far(scores, meta.labels, fars)
    return {
        "tar_at_far": {metrics.far_key(f): t for f, t in tars.items()},
        "num_pairs": int(meta.pairs.shape[0]),
        "num_faces": len(meta.image_names),
        "num_templates": int(np.unique(meta.templates).size),
        "scores": scores,
        "labels": meta.labels,
        "fpr": fpr,
        "tpr": tpr,
    }
