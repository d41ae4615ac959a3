"""Saving and loading backbones: our files and insightface's plain `state_dict` files.

Two on-disk formats, both written with `torch.save` and read with `torch.load(weights_only=True)`:

- ours (`backbone.pt`): `{"name", "kwargs", "state_dict"}`, rebuilt by `get_model(name, **kwargs)`;
- insightface (arcface_torch's `backbone.pth`, `model.pt`): the bare `state_dict` of an
  `iresnet*`, `mbf` or `vit_*`, whose parameter names and shapes ours share. The architecture is
  given (`arch="r100"`) or inferred from the keys and shapes (`infer_architecture`).
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .factory import MODEL_NAMES, get_model
from .iresnet import IRESNET_DEPTHS
from .vit import VIT_SIZES

BACKBONE_FILENAME = "backbone.pt"
FORMATS = ("ours", "insightface")
_FORMAT_KEYS = ("name", "kwargs", "state_dict")
_DDP_PREFIX = "module."
# Architectures whose arcface_torch `get_model(name)` shares our parameter names and shapes.
INSIGHTFACE_ARCHITECTURES = tuple(n for n in MODEL_NAMES if n != "tiny")


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
                  model_kwargs: Optional[Mapping[str, Any]] = None, format: str = "ours") -> Path:
    """Write `model` to `path` with torch.save (atomically), in one of FORMATS.

    "ours": `{"name", "kwargs", "state_dict"}`, where `name` and `model_kwargs` are what
    `get_model(name, **model_kwargs)` takes to rebuild the model (plain Python values, so that the
    file loads with `torch.load(weights_only=True)`). "insightface": the bare `state_dict`, which
    arcface_torch's `get_model(name).load_state_dict(torch.load(path))` takes for r18..r200, mbf and
    vit_t/s/b/l. Tensors are stored on CPU; wrappers (DDP, torch.compile) are unwrapped.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "insightface" and name not in INSIGHTFACE_ARCHITECTURES:
        raise ValueError(f"{name!r} has no insightface equivalent; insightface state_dicts exist "
                         f"for {', '.join(INSIGHTFACE_ARCHITECTURES)}")
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    if format == "insightface":
        payload: Any = state
    else:
        payload = {"name": str(name), "kwargs": dict(model_kwargs or {}), "state_dict": state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # a file object: a failed write (full disk) chains its OSError
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def describe_file(path: Path) -> str:
    """A few words on what a file that torch.load refused holds: an ONNX model, text, a zip
    without data.pkl, ... (for error messages)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as err:
        return f"an unreadable file ({err.strerror})"
    if not head:
        return "an empty file"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "a broken zip archive"
        if not any(n.endswith("data.pkl") for n in names):
            return f"a zip archive without data.pkl ({len(names)} member(s), first: {names[:3]})"
        return "a torch zip archive whose pickle holds objects other than tensors and plain values"
    if path.suffix.lower() == ".onnx" or b"onnx" in head[:64].lower() or b"pytorch" in head[:64]:
        return "an ONNX model (give it to pfc-eval / pfc-extract, which run it through onnxruntime)"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        pass
    if head[:1] == b"\x80":
        return "a legacy (pre-zip) pickle holding objects other than tensors and plain values"
    return f"binary data of an unknown format ({path.stat().st_size} bytes)"


def _torch_load(path: Path, map_location: Any) -> Any:
    """torch.load(weights_only=True) whose failure is a ValueError saying what the file is."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, KeyError, RuntimeError... on foreign bytes
        raise ValueError(f"{path}: not a PyTorch backbone file (expected ours: a dict with "
                         f"{'/'.join(_FORMAT_KEYS)}, or an insightface state_dict); found "
                         f"{describe_file(path)}") from err


def resolve_backbone_path(path: Union[str, os.PathLike]) -> Path:
    """`path` itself, or `path/backbone.pt` when `path` is a (checkpoint) directory."""
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no backbone file at {path}")
    return path


def _block_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def infer_architecture(state: Mapping[str, torch.Tensor]) -> Tuple[str, Dict[str, Any]]:
    """(name, get_model kwargs) of an insightface-format state_dict, from its keys and shapes.

    Recognises IResNet-18/34/50/100/200, MobileFaceNet (any blocks / scale) and ViT-T/S/B/L.
    Raises ValueError naming what was found when the keys fit none of them unambiguously.
    """
    if "fc.weight" in state and "layer1.0.conv1.weight" in state:
        depths = tuple(_block_count(state, f"layer{i}.") for i in range(1, 5))
        matches = [d for d, blocks in IRESNET_DEPTHS.items() if blocks == depths]
        if not matches:
            raise ValueError(f"an IResNet with stage depths {depths}, which is none of "
                             f"{ {f'r{d}': b for d, b in IRESNET_DEPTHS.items()} }")
        return f"r{matches[0]}", {"embedding_size": int(state["fc.weight"].shape[0])}
    if "conv_sep.layers.0.weight" in state and "features.layers.2.weight" in state:
        scale = int(state["layers.0.layers.0.weight"].shape[0]) // 64
        first = 1 if state.get("layers.1.layers.0.weight", torch.empty(0)).ndim == 4 \
            else _block_count(state, "layers.1.layers.")
        blocks = [first] + [_block_count(state, f"layers.{i}.layers.") for i in (3, 5, 7)]
        kwargs: Dict[str, Any] = {"embedding_size": int(state["features.layers.2.weight"].shape[0])}
        if (blocks, scale) != ([1, 4, 6, 2], 2):
            kwargs.update(blocks=blocks, scale=scale)
        return "mbf", kwargs
    if "patch_embed.proj.weight" in state and "feature.2.weight" in state:
        size = (int(state["patch_embed.proj.weight"].shape[0]), _block_count(state, "blocks."))
        matches = [n for n, s in VIT_SIZES.items() if s == size]
        if not matches:
            raise ValueError(f"a ViT of width {size[0]} and depth {size[1]}, which is none of "
                             f"{VIT_SIZES}")
        return matches[0], {"embedding_size": int(state["feature.2.weight"].shape[0])}
    raise ValueError(f"keys that fit no known backbone (first: {sorted(state)[:3]})")


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict) whose error names the missing and unexpected keys and the
    mismatched shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        raise ValueError(f"{what}: {len(missing)} missing keys [{show(missing)}], "
                         f"{len(unexpected)} unexpected keys [{show(unexpected)}], "
                         f"{len(shapes)} shape mismatches [{show(shapes)}]")
    model.load_state_dict(state, strict=True)


def _read(path: Path, map_location: Any) -> Tuple[Optional[str], Dict[str, Any], Dict[str, Any]]:
    """(name or None for insightface files, kwargs, state_dict) of a backbone file."""
    payload = _torch_load(path, map_location)
    if isinstance(payload, dict) and all(k in payload for k in _FORMAT_KEYS):
        return payload["name"], payload["kwargs"], payload["state_dict"]
    if isinstance(payload, dict) and payload and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        state = {k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k: v
                 for k, v in payload.items()}
        return None, {}, state
    raise ValueError(f"{path} is not a backbone file: expected a dict with keys "
                     f"{', '.join(_FORMAT_KEYS)} (ours) or a state_dict of tensors "
                     f"(insightface's backbone.pth), found {type(payload).__name__}"
                     + (f" with keys {sorted(map(str, payload))[:5]}"
                        if isinstance(payload, dict) else ""))


def stored_backbone_name(path: Union[str, os.PathLike]) -> Optional[str]:
    """The architecture name our backbone file (or a directory holding backbone.pt) stores, or
    None for an insightface state_dict, which names none. Raises like `load_backbone`."""
    return _read(resolve_backbone_path(path), "cpu")[0]


def load_backbone(path: Union[str, os.PathLike], map_location: Any = "cpu",
                  arch: Optional[str] = None) -> nn.Module:
    """Rebuild a backbone from our file (or a directory holding backbone.pt) or from an
    insightface state_dict file.

    `arch` (one of MODEL_NAMES) names the architecture of an insightface file; without it, it is
    inferred from the keys, and a ValueError lists the candidates when that fails. For our files
    `arch`, when given, must agree with the stored name. Loads with
    `torch.load(weights_only=True)`, so the file cannot run code; a file torch cannot read that
    way (an ONNX model, text, a pickle of other objects) raises a ValueError saying what it holds
    (`describe_file`). Returned in eval mode.
    """
    path = resolve_backbone_path(path)
    name, kwargs, state = _read(path, map_location)
    if name is None:
        try:
            inferred, kwargs = infer_architecture(state)
        except ValueError as err:
            if arch is None:
                raise ValueError(f"{path}: cannot tell the architecture of this insightface "
                                 f"state_dict: {err}; pass it (--arch / arch=) as one of "
                                 f"{', '.join(MODEL_NAMES)}") from err
            inferred, kwargs = arch, {}
        name = arch or inferred
        kwargs = {"embedding_size": kwargs.get("embedding_size", 512),
                  **(kwargs if name == inferred else {})}
    elif arch is not None and arch != name:
        raise ValueError(f"{path} holds a {name!r} backbone, not the {arch!r} asked for")
    model = get_model(name, **kwargs)
    _load_strict(model, state, f"{path}: weights do not fit {name!r} with {kwargs}")
    if map_location is not None:
        first = next(iter(state.values()), None)
        if first is not None:
            model.to(first.device)
    return model.eval()


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Copy the weights of a backbone file in either format into `model` (in place), with a
    strict key check whose ValueError names the missing and unexpected keys."""
    path = resolve_backbone_path(path)
    _, _, state = _read(path, "cpu")
    _load_strict(_unwrap(model), state, f"{path}: pretrained weights do not fit the model")
    return model
