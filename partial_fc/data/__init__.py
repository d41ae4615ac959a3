"""Data: RecordIO, face datasets, image decoding, distributed sampling, synthetic identities."""
from .image import decode_image

__all__ = ["decode_image"]
