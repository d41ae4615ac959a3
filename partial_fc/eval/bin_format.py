"""Reading insightface verification `.bin` files without letting the pickle run code.

A `.bin` is a pickle of `(list of encoded images, list of bool)`; images 2i and 2i+1 form pair i.
Files written under Python 2 hold the images as `str` and need `encoding="bytes"`; files written
under Python 3 with pickle protocol 2 encode each `bytes` object as a call to
`_codecs.encode(text, "latin1")` (or `bytes()` when empty). Those two callables are admitted, as
wrappers that can only produce bytes; any other global in the file is refused before anything runs.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from partial_fc.progress import progress_bar

PathLike = Union[str, os.PathLike]

log = logging.getLogger(__name__)


def _bytes_from_latin1(text, encoding="latin1", errors="strict"):
    """Stand-in for `_codecs.encode` as Python 3 uses it to pickle bytes under protocol < 3."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1" \
            or errors != "strict":
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') may appear in a .bin")
    return text.encode("latin-1")


def _empty_bytes(*args):
    """Stand-in for `bytes` as pickled for b'' (or bytes(b'...')); never allocates from an int."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    raise pickle.UnpicklingError("only bytes() or bytes(<bytes>) may appear in a .bin")


_ADMITTED_GLOBALS = {
    ("_codecs", "encode"): _bytes_from_latin1,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class _BinUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module, name):
        key = (module.decode() if isinstance(module, bytes) else module,
               name.decode() if isinstance(name, bytes) else name)
        if key in _ADMITTED_GLOBALS:
            return _ADMITTED_GLOBALS[key]
        raise pickle.UnpicklingError(
            f"{self._source}: refusing global {key[0]}.{key[1]}: a verification .bin may hold "
            "only lists of encoded images and bools")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"{self._source}: persistent ids are not allowed in a .bin")


def read_bin_records(path: PathLike) -> Tuple[List[bytes], List[bool]]:
    """Unpickle a `.bin` safely and check its layout; returns (encoded images, issame)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _BinUnpickler(io.BytesIO(data), str(path)).load()
    except pickle.UnpicklingError as err:
        if str(err).startswith(str(path)):  # a refused global, named by the unpickler
            raise
        if "may appear in a .bin" in str(err):  # a stand-in's refusal of its arguments
            raise pickle.UnpicklingError(f"{path}: {err}") from err
        raise ValueError(f"{path}: not a readable verification .bin (expected a pickle of (images, "
                         f"issame)): {err}") from err
    except Exception as err:  # truncated or corrupt streams raise many kinds of errors
        raise ValueError(f"{path}: not a readable verification .bin ({err})") from err
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: images and issame must be lists")
    for i, img in enumerate(images):
        if not isinstance(img, (bytes, bytearray)):
            raise ValueError(f"{path}: image {i} is a {type(img).__name__}, not encoded bytes")
    for i, flag in enumerate(issame):
        if not isinstance(flag, bool):
            raise ValueError(f"{path}: issame[{i}] is a {type(flag).__name__}, not a bool")
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs "
                         f"(expected {2 * len(issame)})")
    return [bytes(img) for img in images], list(issame)


def write_bin(path: PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write an insightface verification `.bin`: a pickle of (list of encoded images, list of
    bool), images 2i and 2i+1 forming pair i, as insightface's `load_bin` reads it.

    The file appears whole or not at all (written beside it, then renamed). Raises ValueError
    when `images` does not hold exactly two images per pair.
    """
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (need exactly two per pair)")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(x) for x in issame]), f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return path


def load_bin(path: PathLike, image_size: Optional[Tuple[int, int]] = None,
             progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Load an insightface verification `.bin` (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, ...).

    Returns `(images, issame)`: `images` a uint8 array of shape (2N, H, W, 3), RGB, HWC, in pair
    order (images 2i and 2i+1 form pair i); `issame` a bool array of N entries. With `image_size`
    (height, width) images of another size are resized bilinearly; without it all images must
    share one size. The pickle is read with an unpickler that admits only the lists, bytes and
    bools of the layout: a file naming any other global raises `pickle.UnpicklingError` and
    nothing in it runs.
    """
    from PIL import Image

    from partial_fc.data import decode_image

    path = Path(path)
    encoded, issame = read_bin_records(path)
    decoded = []
    resized = {}  # original (H, W) -> how many images had it
    for i, blob in enumerate(progress_bar(encoded, enabled=progress, desc=f"decoding {path.name}")):
        try:
            img = decode_image(blob)
        except Exception as err:
            raise ValueError(f"{path}: image {i} cannot be decoded ({err})") from err
        if image_size is not None and img.shape[:2] != tuple(image_size):
            resized[img.shape[:2]] = resized.get(img.shape[:2], 0) + 1
            img = np.asarray(Image.fromarray(img).resize((image_size[1], image_size[0]),
                                                         Image.BILINEAR))
        if decoded and img.shape != decoded[0].shape:
            raise ValueError(f"{path}: image {i} is {img.shape[0]}x{img.shape[1]} (HxW), image 0 is "
                             f"{decoded[0].shape[0]}x{decoded[0].shape[1]}; pass image_size")
        decoded.append(img)
    if resized:
        sizes = ", ".join(f"{n} of {h}x{w}" for (h, w), n in sorted(resized.items()))
        log.warning("%s: %d of %d images resized bilinearly to %dx%d (HxW) (%s): the model sees "
                    "stretched faces unless the set was made for it", path, sum(resized.values()),
                    len(encoded), image_size[0], image_size[1], sizes)
    if not decoded:
        raise ValueError(f"{path}: holds no pairs")
    return np.stack(decoded), np.asarray(issame, dtype=bool)
