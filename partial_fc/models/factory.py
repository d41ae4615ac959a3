"""Backbone construction by name."""
from __future__ import annotations

from torch import nn

from .iresnet import iresnet
from .mobilefacenet import MobileFaceNet
from .tiny import TinyFaceNet
from .vit import VIT_SIZES, vit

MODEL_NAMES = ("r18", "r34", "r50", "r100", "r200", "mbf", *VIT_SIZES, "tiny")


def get_model(name: str, embedding_size: int = 512, **kwargs) -> nn.Module:
    """Build backbone `name` (one of MODEL_NAMES) with an `embedding_size`-d output.

    Common keyword arguments: `dropout` (before the final FC, default 0) and
    `activation_checkpointing` (recompute each stage in backward, default False). Model-specific
    ones: `zero_init_residual` (iresnets), `blocks` / `scale` (mbf), `drop_path_rate` /
    `mask_ratio` (vit_*), `widths` (tiny).
    """
    if name.startswith("r") and name[1:].isdigit():
        return iresnet(int(name[1:]), embedding_size=embedding_size, **kwargs)
    if name == "mbf":
        return MobileFaceNet(embedding_size=embedding_size, **kwargs)
    if name in VIT_SIZES:
        return vit(name, embedding_size=embedding_size, **kwargs)
    if name == "tiny":
        return TinyFaceNet(embedding_size=embedding_size, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(MODEL_NAMES)}")
