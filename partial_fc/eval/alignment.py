"""Five-point face alignment to the standard 112x112 ArcFace template.

Landmarks (left eye, right eye, nose tip, left and right mouth corners) are mapped onto
`ARCFACE_TEMPLATE` by the least-squares similarity transform (Umeyama 1991, no reflection), and
the image is warped bilinearly with black borders. Coordinates use the OpenCV convention, where
pixel (i, j) has its centre at (i, j), as the landmark files of IJB-B/C and insightface do.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image

# The reference positions of the five landmarks in a 112x112 ArcFace crop (x, y).
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M of the similarity (scale, rotation, translation) with M @ [src; 1] ~ dst,
    least squares over the point pairs, in float64."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"expected two K x 2 point sets (K >= 2), got {src.shape} and {dst.shape}")
    mean_src, mean_dst = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    cov = dst_c.T @ src_c / src.shape[0]
    u, s, vt = np.linalg.svd(cov)
    signs = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rotation = u @ np.diag(signs) @ vt
    var_src = np.mean(np.sum(src_c ** 2, axis=1))
    if var_src <= 0:
        raise ValueError("landmarks are all at one point")
    scale = float(np.sum(s * signs) / var_src)
    translation = mean_dst - scale * rotation @ mean_src
    return np.hstack([scale * rotation, translation[:, None]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Warp uint8 HxWx3 `image` by the 2x3 `matrix` (source -> output coordinates, OpenCV pixel
    convention) into an output of `size` (width, height); bilinear, black outside the source."""
    forward = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    # PIL samples at pixel centres (x + 0.5) and its pixel i spans [i, i + 1): shift by half a
    # pixel on both sides so that output pixel i reads source position inverse @ (i, 1).
    linear, offset = inverse[:, :2], inverse[:, 2]
    offset = offset - linear @ np.array([0.5, 0.5]) + 0.5
    coeffs = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
    warped = Image.fromarray(image).transform(tuple(size), Image.AFFINE, data=coeffs,
                                              resample=Image.BILINEAR)
    return np.asarray(warped)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Crop uint8 HxWx3 `image` to a `size` x `size` ArcFace crop from 5 (x, y) landmarks."""
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    template = ARCFACE_TEMPLATE * (size / 112.0)
    return warp_affine(image, estimate_similarity(landmarks, template), (size, size))
