"""Data: RecordIO, face datasets, image decoding, distributed sampling, synthetic identities."""
from .datasets import BadSampleError, FaceRecordDataset, ImageFolderDataset, LabelError
from .image import ImageDecodeError, decode_image, decode_image_cuda
from .recordio import IRHeader, RecordIOError, RecordIOReader, RecordIOWriter, pack, unpack
from .sampler import DistributedShardSampler
from .synthetic import generate_synthetic
from .transforms import eval_transform, train_transform

__all__ = [
    "decode_image",
    "decode_image_cuda",
    "ImageDecodeError",
    "train_transform",
    "eval_transform",
    "FaceRecordDataset",
    "ImageFolderDataset",
    "BadSampleError",
    "LabelError",
    "DistributedShardSampler",
    "RecordIOReader",
    "RecordIOWriter",
    "RecordIOError",
    "IRHeader",
    "pack",
    "unpack",
    "generate_synthetic",
]
