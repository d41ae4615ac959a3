"""Image transforms: uint8 HxWx3 RGB -> normalised float32 CxHxW, per sample or per batch.

Normalisation is insightface's ``(x - 127.5) / 128``. Every intermediate of that formula is exactly
representable in float32 (x - 127.5 is a half-integer, 128 a power of two), so the per-sample
transform, the batched one and any device give bit-identical tensors.

Two ways to use them:

- :func:`train_transform` / :func:`eval_transform`: per sample, for any DataLoader
  (``FaceRecordDataset(root, transform=train_transform())``).
- :func:`flip_image` in the worker and :func:`normalize_batch` on the training device: workers
  ship uint8 NxHxWx3 batches (a quarter of the bytes through shared memory, pinned memory and
  the host-to-device copy) and the GPU does the float conversion (bench/RESULTS.md, "Data loader").
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

__all__ = [
    "TrainTransform",
    "EvalTransform",
    "train_transform",
    "eval_transform",
    "normalize_image",
    "normalize_batch",
    "flip_image",
]

_MEAN = 127.5
_INV_STD = 1.0 / 128.0  # a power of two: multiplying is exactly dividing by 128
_MEAN32, _INV_STD32 = np.float32(_MEAN), np.float32(_INV_STD)


def _as_hwc_array(image) -> np.ndarray:
    """``image`` (array or CPU tensor, HxWx3 or HxW) as a uint8-compatible HxWx3 numpy view."""
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = np.broadcast_to(arr[:, :, None], arr.shape + (3,))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 (or HxW) image, got shape {arr.shape}")
    return arr


def _mirrored(arr: np.ndarray, axis: int) -> np.ndarray:
    """A copy of ``arr`` mirrored along ``axis`` (torch's flip kernel: numpy's copy of a
    negative-stride view is several times slower on images)."""
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr).flip(axis).numpy()


def normalize_image(image, flip: bool = False) -> torch.Tensor:
    """uint8 HxWx3 (or HxW) array or CPU tensor -> contiguous float32 CxHxW tensor
    ``(x - 127.5) / 128``, optionally mirrored left-right. The input is not modified."""
    # Transpose and mirror in uint8 (a quarter of the bytes), then one contiguous cast: about
    # half the time of casting first (bench/RESULTS.md, "Data loader").
    chw = np.array(_as_hwc_array(image).transpose(2, 0, 1), order="C")
    if flip:
        chw = _mirrored(chw, 2)
    out = chw.astype(np.float32)
    out -= _MEAN32
    out *= _INV_STD32
    return torch.from_numpy(out)


def flip_image(image, flip: bool) -> torch.Tensor:
    """uint8 HxWx3 image as a tensor, mirrored left-right when ``flip`` (a copy), else shared
    with the input (copied only when the input array is read-only)."""
    arr = _as_hwc_array(image)
    if flip:
        arr = _mirrored(arr, 1)
    elif not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr, order="C")  # torch.from_numpy takes neither read-only nor strided views
    return torch.from_numpy(arr)


def normalize_batch(images: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 NxHxWx3 batch -> float32 Nx3xHxW ``(x - 127.5) / 128`` on the batch's own device,
    in ``memory_format`` (``torch.channels_last`` avoids the transposing write). Equal bit for
    bit to :func:`normalize_image` of each image."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
        raise ValueError(
            f"expected a uint8 NxHxWx3 batch, got dtype {images.dtype} and shape {tuple(images.shape)}"
        )
    out = torch.empty(images.shape[0], 3, images.shape[1], images.shape[2], dtype=torch.float32,
                      device=images.device, memory_format=memory_format)
    out.copy_(images.permute(0, 3, 1, 2))
    return out.sub_(_MEAN).mul_(_INV_STD)


class TrainTransform:
    """Random horizontal flip (probability ``flip_prob``) then ``(x - 127.5) / 128``.

    Randomness comes from Python's ``random`` module, which PyTorch's DataLoader seeds
    differently in every worker process; pass ``rng`` (a ``random.Random``) to control it.
    """

    def __init__(self, flip_prob: float = 0.5, rng: Optional[random.Random] = None):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = flip_prob
        self.rng = rng

    def __call__(self, image) -> torch.Tensor:
        draw = self.rng.random() if self.rng is not None else random.random()
        return normalize_image(image, flip=draw < self.flip_prob)

    def __repr__(self):
        return f"TrainTransform(flip_prob={self.flip_prob})"


class EvalTransform:
    """``(x - 127.5) / 128`` without augmentation."""

    def __call__(self, image) -> torch.Tensor:
        return normalize_image(image, flip=False)

    def __repr__(self):
        return "EvalTransform()"


def train_transform(flip_prob: float = 0.5, rng: Optional[random.Random] = None) -> TrainTransform:
    """The training transform: random horizontal flip and ``(x - 127.5) / 128`` to float32 CHW."""
    return TrainTransform(flip_prob=flip_prob, rng=rng)


def eval_transform() -> EvalTransform:
    """The evaluation transform: ``(x - 127.5) / 128`` to float32 CHW."""
    return EvalTransform()
