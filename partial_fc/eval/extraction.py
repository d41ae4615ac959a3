"""Embedding extraction for an image folder or an MXNet `.rec`, written as `.npy` files.

    features, keys, labels = extract_features(model, "faces/")          # folder of aligned crops
    write_features("out/feats.npy", features, keys, labels)
    # -> out/feats.npy (float32 N x D), out/feats.keys.npy (N keys), out/feats.labels.npy

Folder keys are the image paths relative to the folder (sorted, recursive); `.rec` keys are the
record keys, with each image's class label.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import IMAGE_EXTENSIONS
from .embedding import embed_loader

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _to_chw(image: np.ndarray, size: Tuple[int, int], resize: bool, source: str) -> torch.Tensor:
    if image.shape[:2] != tuple(size):
        if not resize:
            raise ValueError(f"{source} is {image.shape[0]}x{image.shape[1]} (HxW), the model takes "
                             f"{size[0]}x{size[1]} aligned crops (allow resizing to rescale)")
        from PIL import Image
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class ImageFolderFaces(Dataset):
    """Every image under `root` (recursive, sorted by relative path) as uint8 3 x H x W."""

    def __init__(self, root: PathLike, size: Tuple[int, int] = (112, 112), resize: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"no image folder at {self.root}")
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        self.paths = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.paths:
            raise ValueError(f"{self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if others:
            log.warning("%s: %d file(s) without an image extension not embedded, e.g. %s (image "
                        "extensions: %s)", self.root, len(others), others[0], " ".join(IMAGE_EXTENSIONS))
        self.keys = [p.relative_to(self.root).as_posix() for p in self.paths]
        self.size, self.resize = tuple(size), resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from partial_fc.data import decode_image

        try:
            image = decode_image(self.paths[i].read_bytes())
        except Exception as err:
            raise ValueError(f"cannot decode {self.paths[i]}: {err}") from err
        return _to_chw(image, self.size, self.resize, str(self.paths[i]))


def _header_field(header, name: str, index: int):
    return getattr(header, name) if hasattr(header, name) else header[index]


def _first_label(label) -> float:
    return float(np.atleast_1d(np.asarray(label, dtype=np.float64)).reshape(-1)[0])


class RecordFaces(Dataset):
    """The images of an MXNet `.rec` (InsightFace layout or im2rec) as (uint8 3 x H x W, label).

    The reader is opened lazily in each process, so the dataset works with DataLoader workers.
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None,
                 size: Tuple[int, int] = (112, 112), resize: bool = False):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self.size, self.resize = tuple(size), resize
        self._reader = None
        self._reader_pid = None
        self.keys = self._image_keys()

    def _open(self):
        if self._reader is None or self._reader_pid != os.getpid():
            from partial_fc.data import RecordIOReader

            self._reader = RecordIOReader(str(self.rec_path),
                                          str(self.idx_path) if self.idx_path else None)
            self._reader_pid = os.getpid()
        return self._reader

    def _image_keys(self) -> List[int]:
        from partial_fc.data.recordio import unpack

        reader = self._open()
        keys = sorted(int(k) for k in reader.keys)
        if keys and keys[0] == 0:
            header, payload = unpack(reader.read(0))
            # InsightFace header record (flag >= 2, no image): images 1..N; an im2rec image at key 0
            # with an array label is an image like the others
            if _header_field(header, "flag", 0) >= 2 and not payload:
                end = int(_first_label(_header_field(header, "label", 1)))
                return [k for k in keys if 1 <= k < end]
        return keys

    def __getstate__(self) -> Dict[str, object]:
        state = dict(self.__dict__)
        state["_reader"] = state["_reader_pid"] = None  # reopened in the worker process
        return state

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, float]:
        from partial_fc.data import decode_image
        from partial_fc.data.recordio import unpack

        key = self.keys[i]
        header, payload = unpack(self._open().read(key))
        source = f"{self.rec_path} record {key}"
        try:
            image = decode_image(payload)
        except Exception as err:
            raise ValueError(f"cannot decode {source}: {err}") from err
        return _to_chw(image, self.size, self.resize, source), _first_label(
            _header_field(header, "label", 1))


def extract_features(model: nn.Module, source: PathLike, idx_path: Optional[PathLike] = None,
                     batch_size: int = 128, device: Optional[Union[str, torch.device]] = None,
                     num_workers: int = 0, flip: bool = True, normalize: bool = True,
                     resize: bool = False, size: Tuple[int, int] = (112, 112),
                     autocast_dtype: Optional[torch.dtype] = None, progress: bool = True
                     ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Embeddings of every face in an image folder or a `.rec`: (features, keys, labels).

    `features` float32 N x D, flip-fused and (with `normalize`) L2-normalised; `keys` the relative
    paths (folder) or record keys (`.rec`); `labels` the class labels of a `.rec`, else None.
    """
    source = Path(source)
    if source.is_dir():
        dataset: Dataset = ImageFolderFaces(source, size=size, resize=resize)
        keys = np.asarray(dataset.keys)
    elif source.suffix == ".rec":
        dataset = RecordFaces(source, idx_path, size=size, resize=resize)
        keys = np.asarray(dataset.keys, dtype=np.int64)
    else:
        raise ValueError(f"{source}: expected an image folder or a .rec file")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    labels = None
    if isinstance(dataset, RecordFaces):
        label_chunks: List[np.ndarray] = []

        def images_only():
            for images, batch_labels in loader:
                label_chunks.append(np.asarray(batch_labels, dtype=np.float64))
                yield images

        feats = embed_loader(model, images_only(), device=device, flip=flip,
                             autocast_dtype=autocast_dtype, progress=progress,
                             desc=f"extracting {source.name}", total=len(loader))
        labels = np.concatenate(label_chunks).astype(np.int64)
    else:
        feats = embed_loader(model, loader, device=device, flip=flip,
                             autocast_dtype=autocast_dtype, progress=progress,
                             desc=f"extracting {source.name}", total=len(loader))
    if normalize:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True),
                                   np.finfo(np.float32).tiny)
    return feats.astype(np.float32), keys, labels


def output_paths(output: PathLike) -> Dict[str, Path]:
    """Where `write_features` puts features, keys and labels for an output name `x.npy`."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix == ".npy" else output
    return {"features": stem.with_name(stem.name + ".npy"),
            "keys": stem.with_name(stem.name + ".keys.npy"),
            "labels": stem.with_name(stem.name + ".labels.npy")}


def write_features(output: PathLike, features: np.ndarray, keys: np.ndarray,
                   labels: Optional[np.ndarray] = None) -> Dict[str, Path]:
    """Write features (x.npy), keys (x.keys.npy) and labels if any (x.labels.npy); all load with
    `np.load(..., allow_pickle=False)`."""
    paths = output_paths(output)
    paths["features"].parent.mkdir(parents=True, exist_ok=True)
    np.save(paths["features"], features, allow_pickle=False)
    np.save(paths["keys"], keys, allow_pickle=False)
    written = {"features": paths["features"], "keys": paths["keys"]}
    if labels is not None:
        np.save(paths["labels"], labels, allow_pickle=False)
        written["labels"] = paths["labels"]
    return written
