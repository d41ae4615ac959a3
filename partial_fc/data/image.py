"""JPEG decoding to uint8 RGB arrays."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(jpeg_bytes: bytes) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, ...) to a uint8 HxWx3 RGB array."""
    with Image.open(io.BytesIO(jpeg_bytes)) as im:
        return np.asarray(im.convert("RGB"))
