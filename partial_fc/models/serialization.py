"""Saving and loading a backbone together with the name and arguments that rebuild it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .factory import get_model

BACKBONE_FILENAME = "backbone.pt"
_FORMAT_KEYS = ("name", "kwargs", "state_dict")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_backbone(path: Union[str, os.PathLike], model: nn.Module, name: str,
                  model_kwargs: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `{"name", "kwargs", "state_dict"}` to `path` with torch.save (atomically).

    `name` and `model_kwargs` must be what `get_model(name, **model_kwargs)` takes to rebuild the
    model; they should be plain Python values (numbers, strings, lists) so that the file loads
    with `torch.load(weights_only=True)`. Tensors are stored on CPU; wrappers (DDP,
    torch.compile) are unwrapped.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    payload = {"name": str(name), "kwargs": dict(model_kwargs or {}), "state_dict": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def resolve_backbone_path(path: Union[str, os.PathLike]) -> Path:
    """`path` itself, or `path/backbone.pt` when `path` is a (checkpoint) directory."""
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no backbone file at {path}")
    return path


def load_backbone(path: Union[str, os.PathLike], map_location: Any = "cpu") -> nn.Module:
    """Rebuild a backbone written by `save_backbone` (file, or directory holding backbone.pt).

    Loads with `torch.load(weights_only=True)`, so the file cannot run code. The model is
    returned in eval mode.
    """
    path = resolve_backbone_path(path)
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or any(k not in payload for k in _FORMAT_KEYS):
        raise ValueError(f"{path} is not a backbone file: expected a dict with keys "
                         f"{', '.join(_FORMAT_KEYS)}")
    model = get_model(payload["name"], **payload["kwargs"])
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit {payload['name']!r} "
                         f"with {payload['kwargs']}: {err}") from err
    if map_location is not None:
        first = next(iter(payload["state_dict"].values()), None)
        if first is not None:
            model.to(first.device)
    return model.eval()
