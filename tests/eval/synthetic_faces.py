"""Synthetic 'identities' for evaluation tests: each one a fixed random pattern of blobs.

Images of one identity differ by noise, brightness and a small shift, so a pixel-level
embedding separates identities well and a verification set made of them is meaningful.
"""
import io
import pickle

import numpy as np
from PIL import Image


def identity_template(identity: int, size: int = 112) -> np.ndarray:
    """A smooth random colour pattern, float32 HxWx3 in [0, 255], fixed per identity."""
    rng = np.random.default_rng(1000 + identity)
    coarse = rng.uniform(0, 255, (7, 7, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)


def face_image(identity: int, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """One uint8 HxWx3 'photo' of `identity`."""
    img = identity_template(identity, size) * rng.uniform(0.85, 1.15)
    img = np.roll(img, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_pairs(num_pairs: int, num_ids: int = 12, seed: int = 0, size: int = 112):
    """(list of JPEG bytes in pair order, list of bool issame), alternating genuine/impostor."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for i in range(num_pairs):
        a = int(rng.integers(num_ids))
        same = i % 2 == 0
        b = a if same else int((a + rng.integers(1, num_ids)) % num_ids)
        images += [jpeg_bytes(face_image(a, rng, size)), jpeg_bytes(face_image(b, rng, size))]
        issame.append(same)
    return images, issame


def write_bin(path, images, issame, protocol: int = pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=protocol)
    return path
