"""Per-sample transforms: uint8 HxWx3 RGB array -> normalised float32 CxHxW tensor.

Normalisation is insightface's ``(x - 127.5) / 128``. Written in numpy on the uint8 array (one
fused pass per step, no PIL round trip), which is what makes the per-sample pipeline cheap.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

__all__ = ["TrainTransform", "EvalTransform", "train_transform", "eval_transform", "normalize_image"]

_MEAN = np.float32(127.5)
_INV_STD = np.float32(1.0 / 128.0)  # a power of two: multiplying is exactly dividing by 128


def normalize_image(image: np.ndarray, flip: bool = False) -> torch.Tensor:
    """uint8 HxWx3 (or HxW) array -> float32 CxHxW tensor ``(x - 127.5) / 128``, optionally
    mirrored left-right. The input is not modified."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None].repeat(3, axis=2)
    if arr.ndim != 3:
        raise ValueError(f"expected an HxWx3 image array, got shape {arr.shape}")
    chw = arr.transpose(2, 0, 1).astype(np.float32)  # contiguous CHW copy
    if flip:
        # mirror while subtracting: reading the float copy backwards is cheap, whereas casting a
        # mirrored uint8 view is several times slower
        out = np.empty_like(chw)
        np.subtract(chw[:, :, ::-1], _MEAN, out=out)
    else:
        out = chw
        out -= _MEAN
    out *= _INV_STD
    return torch.from_numpy(out)


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

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        draw = self.rng.random() if self.rng is not None else random.random()
        return normalize_image(image, flip=draw < self.flip_prob)

    def __repr__(self):
        return f"TrainTransform(flip_prob={self.flip_prob})"


class EvalTransform:
    """``(x - 127.5) / 128`` without augmentation."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return normalize_image(image, flip=False)

    def __repr__(self):
        return "EvalTransform()"


def train_transform(flip_prob: float = 0.5, rng: Optional[random.Random] = None) -> TrainTransform:
    """The training transform: random horizontal flip and ``(x - 127.5) / 128`` to float32 CHW."""
    return TrainTransform(flip_prob=flip_prob, rng=rng)


def eval_transform() -> EvalTransform:
    """The evaluation transform: ``(x - 127.5) / 128`` to float32 CHW."""
    return EvalTransform()
