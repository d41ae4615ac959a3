"""Helpers shared by the data tests (a uniquely named module: tests have no __init__ files)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_identity_folder(root: Path, num_ids: int = 3, per_id=(2, 3, 1), size=(40, 32), seed: int = 0) -> Path:
    """root/<id_name>/<img>.jpg with random smooth pictures; returns root."""
    rng = np.random.default_rng(seed)
    for i in range(num_ids):
        d = root / f"person_{chr(ord('a') + i)}"
        d.mkdir(parents=True)
        for k in range(per_id[i % len(per_id)]):
            base = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(base).resize(size, Image.BILINEAR))
            (d / f"img_{k:02d}.jpg").write_bytes(jpeg_bytes(img))
    return root
