"""Flip-fused embeddings of uint8 face crops, in batches, on the model's device."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from partial_fc.progress import progress_bar


INPUT_MEAN = 127.5
INPUT_STD = 128.0


def preprocess(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W RGB -> float32 (x - 127.5) / 128, the ArcFace input convention."""
    return (images_uint8.float() - INPUT_MEAN) / INPUT_STD


@dataclass(frozen=True)
class InputConvention:
    """What a model expects of its float input: channel order and (x - mean) / std per pixel
    value in 0..255. Ours (RGB, 127.5, 128) is the default; insightface's published ONNX models
    take BGR or RGB with std 127.5 (arcface_torch's own `inference.py`: RGB, 127.5, 127.5)."""

    mean: float = INPUT_MEAN
    std: float = INPUT_STD
    bgr: bool = False

    def __post_init__(self):
        if not self.std > 0:
            raise ValueError(f"input std must be > 0, got {self.std}")

    def is_ours(self) -> bool:
        return (self.mean, self.std, self.bgr) == (INPUT_MEAN, INPUT_STD, False)

    def from_ours(self, x: torch.Tensor) -> torch.Tensor:
        """Our preprocessed N x 3 x H x W RGB tensor -> this convention (a new tensor)."""
        pixels = x * INPUT_STD + INPUT_MEAN
        if self.bgr:
            pixels = pixels.flip(1)
        return (pixels - self.mean) / self.std


class Reconvention(nn.Module):
    """`model` fed our preprocessed images converted to its own `convention`."""

    def __init__(self, model: nn.Module, convention: InputConvention):
        super().__init__()
        self.model = model
        self.convention = convention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.convention.from_ours(x))


def to_chw_tensor(images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 images N x H x W x 3 (as `load_bin` gives them) or N x 3 x H x W -> N x 3 x H x W."""
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 images of rank 4, got {t.dtype} {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[3] == 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"expected 3-channel images, got shape {tuple(t.shape)}")
    return t.contiguous()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for parameterless modules)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def embed_views(model: nn.Module, batch_uint8: torch.Tensor, flip: bool = True,
                device: Optional[torch.device] = None,
                autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """float32 embeddings of one uint8 NCHW batch of n images: n x D, or with `flip` 2n x D
    (the images, then their horizontal mirrors, in one call; models of a fixed batch size split
    it themselves, see `OnnxBackbone`)."""
    device = torch.device(device) if device is not None else model_device(model)
    x = preprocess(batch_uint8.to(device, non_blocking=True))
    if flip:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        emb = model(x)
    return emb.float()


def fuse_views(views: torch.Tensor, flip: bool) -> torch.Tensor:
    """emb(image) + emb(mirror) from the output of `embed_views`."""
    if not flip:
        return views
    n = views.shape[0] // 2
    return views[:n] + views[n:]


def embed_batch(model: nn.Module, batch_uint8: torch.Tensor, flip: bool = True,
                device: Optional[torch.device] = None,
                autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Unnormalised (flip-fused when `flip`) float32 embeddings of one uint8 NCHW batch."""
    return fuse_views(embed_views(model, batch_uint8, flip, device, autocast_dtype), flip)


def iter_batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def embed_images(model: nn.Module, images: Union[np.ndarray, torch.Tensor], batch_size: int = 128,
                 device: Optional[Union[str, torch.device]] = None, flip: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None, progress: bool = False,
                 desc: str = "embedding") -> Tuple[np.ndarray, np.ndarray]:
    """Embeddings of uint8 face crops: (L2-normalised fused float32 N x D, view norms).

    The view norms are the norms of the model's raw embeddings of each image and (with `flip`)
    of its mirror, N or 2N values; their mean is insightface's "XNorm". The model runs in eval
    mode under no_grad (its train/eval mode is restored afterwards) on `device`, default the
    model's own device.
    """
    chw = to_chw_tensor(images)
    if device is None:
        device = model_device(model)
    device = torch.device(device)
    fused, view_norms = [], []
    with eval_mode(model):
        for batch in progress_bar(iter_batches(chw, batch_size), enabled=progress,
                                  total=-(-chw.shape[0] // batch_size), desc=desc):
            views = embed_views(model, batch, flip, device, autocast_dtype)
            view_norms.append(views.double().norm(dim=1).cpu())
            fused.append(fuse_views(views, flip).cpu())
    emb = torch.cat(fused).double()
    norms = emb.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (emb / norms).float().numpy(), torch.cat(view_norms).float().numpy()


def embed_loader(model: nn.Module, loader: Iterable, device: Optional[Union[str, torch.device]] = None,
                 flip: bool = True, autocast_dtype: Optional[torch.dtype] = None,
                 progress: bool = True, desc: str = "embedding",
                 total: Optional[int] = None) -> np.ndarray:
    """Unnormalised (flip-fused) float32 embeddings of every uint8 NCHW batch `loader` yields.

    A batch may also be a (images, ...) tuple or list; only its first element is used.
    """
    if device is None:
        device = model_device(model)
    device = torch.device(device)
    chunks = []
    with eval_mode(model):
        for batch in progress_bar(loader, enabled=progress, desc=desc, total=total):
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            chunks.append(embed_batch(model, batch, flip, device, autocast_dtype).cpu().numpy())
    if not chunks:
        raise ValueError("no images to embed")
    return np.concatenate(chunks)
