"""Packing images into InsightFace-layout RecordIO (``train.rec``, ``train.idx``, ``property``).

Sources: a folder with one sub-folder per identity (identities in sorted name order, images in
sorted file-name order), or a list file of ``path<TAB>label`` lines (relative paths are taken from
the list file's folder; images are grouped by label, keeping the file's order within a label).
Images are read (and optionally validated, resized, re-encoded) in worker processes; records are
written in a deterministic order whatever the number of workers.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from .datasets import IMAGE_EXTENSIONS, LabelError
from .image import ImageDecodeError, decode_image
from .parallel import imap_ordered
from .recordio import IRHeader, encode_record, pack

__all__ = ["PackError", "list_image_folder", "read_list_file", "pack_images", "pack_dataset"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class PackError(ValueError):
    """The source of a pack run is unusable (unreadable images, missing identities...)."""


def list_image_folder(root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Tuple[Path, int]]:
    """``(path, label)`` for ``root/<identity>/<image>``: identities sorted by name, images by
    file name. An identity folder without images raises LabelError."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    identities = sorted(p for p in root.iterdir() if p.is_dir())
    if not identities:
        raise LabelError(f"{root}: no identity folders")
    items: List[Tuple[Path, int]] = []
    for label, folder in enumerate(identities):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)
        if not files:
            raise LabelError(f"{folder}: identity {label} ({folder.name!r}) has no images")
        items.extend((p, label) for p in files)
    return items


def read_list_file(list_path: PathLike) -> List[Tuple[Path, int]]:
    """``(path, label)`` from ``path<TAB>label`` lines, grouped by label (stable).

    Labels must be integers covering 0..max: a label with no image raises LabelError.
    """
    list_path = Path(list_path)
    base = list_path.parent
    items = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 2:
            raise PackError(f"{list_path}:{lineno}: expected 'path<TAB>label', got {line[:80]!r}")
        path_text, label_text = fields[0], fields[-1]
        try:
            label = int(float(label_text))
            if float(label_text) != label or label < 0:
                raise ValueError
        except ValueError:
            raise PackError(f"{list_path}:{lineno}: label {label_text!r} is not a class index >= 0") from None
        path = Path(path_text)
        items.append((path if path.is_absolute() else base / path, label))
    if not items:
        raise PackError(f"{list_path}: no entries")
    items.sort(key=lambda item: item[1])  # stable: keeps the file's order within a label
    present = {label for _, label in items}
    top = items[-1][1]
    missing = [k for k in range(top + 1) if k not in present]
    if missing:
        raise LabelError(
            f"{list_path}: identity {missing[0]} has no images "
            f"({len(missing)} of the labels 0..{top} have none)"
        )
    return items


def _parse_size(resize) -> Optional[Tuple[int, int]]:
    if resize is None:
        return None
    if isinstance(resize, int):
        return (resize, resize)
    if isinstance(resize, str):
        parts = resize.lower().replace("x", ",").split(",")
        vals = [int(p) for p in parts if p.strip()]
        return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    w, h = resize
    return int(w), int(h)


def _load_image(task):
    """Worker: bytes for one image, or an error message. task = (path, size, quality, validate,
    reencode)."""
    path, size, quality, validate, reencode = task
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return None, None, f"{path}: cannot read: {err}"
    try:
        if size is None and not reencode:
            if validate:
                arr = decode_image(data)
                return data, (arr.shape[1], arr.shape[0]), None
            with Image.open(io.BytesIO(data)) as im:  # header only: width, height
                return data, im.size, None
        arr = decode_image(data)
        im = Image.fromarray(arr)
        if size is not None and im.size != size:
            im = im.resize(size, Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), im.size, None
    except (ImageDecodeError, OSError, ValueError) as err:
        return None, None, f"{path}: {err}"


def pack_images(
    items: Sequence[Tuple[PathLike, int]],
    out_dir: PathLike,
    *,
    resize=None,
    quality: int = 95,
    validate: bool = False,
    reencode: bool = False,
    skip_bad: bool = False,
    workers: int = 1,
    progress: bool = True,
    prefix: str = "train",
) -> Dict:
    """Write ``(path, label)`` items (grouped by label, labels 0..C-1) as an InsightFace dataset.

    Record 0 is the header (label ``[N+1, N+1+C]``), keys 1..N the images (scalar labels, in the
    given order), keys N+1..N+C each identity's ``[first key, end key)``; ``property`` holds
    ``C,H,W`` (H, W from ``resize`` or the first image).

    ``validate`` decodes every image; ``resize`` (int or (W, H) or "WxH") and ``reencode``
    re-encode as JPEG with ``quality``. An unreadable image raises PackError, or with
    ``skip_bad`` is left out and listed in the summary (an identity left without images still
    raises LabelError).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [(Path(p), int(label)) for p, label in items]
    if not items:
        raise PackError("nothing to pack")
    labels = [label for _, label in items]
    if any(b < a for a, b in zip(labels, labels[1:])):
        raise PackError("items must be grouped by label in increasing order (see read_list_file)")
    num_classes = labels[-1] + 1
    size = _parse_size(resize)
    tasks = [(str(p), size, quality, validate, reencode) for p, _ in items]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=f"packing {out.name}", unit="img", leave=False, disable=None)
    results = imap_ordered(_load_image, tasks, workers, chunksize=16)

    rec_path, idx_path = out / f"{prefix}.rec", out / f"{prefix}.idx"
    body_path = out / f".{prefix}.body.tmp"
    bad: List[str] = []
    first_size = None
    counts = [0] * num_classes
    body_offsets: List[int] = []
    body_labels: List[int] = []
    try:
        # Images go to a body stream first: the header record (key 0, first in the file) needs
        # the final image count, which validation with skip_bad only knows at the end. Frames are
        # position independent, so the body is then copied behind the header unchanged.
        with open(body_path, "wb") as body:
            pos = 0
            for (path, label), (data, dims, err) in zip(items, results):
                if bar is not None:
                    bar.update(1)
                if err is not None:
                    if not skip_bad:
                        raise PackError(f"unusable image: {err} (use skip_bad to leave such images out)")
                    log.warning("leaving out %s", err)
                    bad.append(err)
                    continue
                if first_size is None:
                    first_size = dims
                key = len(body_offsets) + 1
                frames = encode_record(pack(IRHeader(0, float(label), key, 0), data))
                body.write(frames)
                body_offsets.append(pos)
                body_labels.append(label)
                counts[label] += 1
                pos += len(frames)
    except BaseException:
        body_path.unlink(missing_ok=True)
        raise
    finally:
        results.close()  # ends the worker pool
        if bar is not None:
            bar.close()

    try:
        empty = [k for k, c in enumerate(counts) if c == 0]
        if empty:
            raise LabelError(f"identity {empty[0]} has no images ({len(empty)} identities have none)")
        n = len(body_offsets)
        first_identity_key = n + 1
        tmp_rec, tmp_idx = rec_path.with_name(rec_path.name + ".tmp"), idx_path.with_name(idx_path.name + ".tmp")
        header = encode_record(pack(IRHeader(0, [first_identity_key, first_identity_key + num_classes], 0, 0), b""))
        idx_lines = ["0\t0\n"]
        idx_lines.extend(f"{i + 1}\t{off + len(header)}\n" for i, off in enumerate(body_offsets))
        with open(tmp_rec, "wb") as rec:
            rec.write(header)
            with open(body_path, "rb") as body:
                shutil.copyfileobj(body, rec, 1 << 22)
            pos = rec.tell()
            start = 1
            for label in range(num_classes):
                key = first_identity_key + label
                frames = encode_record(pack(IRHeader(0, [start, start + counts[label]], key, 0), b""))
                rec.write(frames)
                idx_lines.append(f"{key}\t{pos}\n")
                pos += len(frames)
                start += counts[label]
        tmp_idx.write_text("".join(idx_lines), encoding="ascii")
        os.replace(tmp_rec, rec_path)
        os.replace(tmp_idx, idx_path)
    finally:
        body_path.unlink(missing_ok=True)
    width, height = size if size is not None else first_size
    (out / "property").write_text(f"{num_classes},{height},{width}\n")
    return {
        "rec": str(rec_path),
        "idx": str(idx_path),
        "property": str(out / "property"),
        "num_images": n,
        "num_classes": num_classes,
        "image_size": [height, width],
        "skipped": bad,
    }


def pack_dataset(source: PathLike, out_dir: PathLike, **kwargs) -> Dict:
    """Pack a folder of identity folders, or a ``path<TAB>label`` list file, into ``out_dir``."""
    source = Path(source)
    items = list_image_folder(source) if source.is_dir() else read_list_file(source)
    return pack_images(items, out_dir, **kwargs)
