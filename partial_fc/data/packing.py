"""Packing images into InsightFace-layout RecordIO (``train.rec``, ``train.idx``, ``property``).

Sources: a folder with one sub-folder per identity (identities in sorted name order, images in
sorted file-name order), or a list file of ``path<TAB>label`` lines (relative paths are taken from
the list file's folder; images are grouped by label, keeping the file's order within a label).
Images are read (and optionally validated, resized, re-encoded) in worker processes; records are
written in a deterministic order whatever the number of workers. Image files are those with an
extension in ``IMAGE_EXTENSIONS`` (the same list for folders and list files). Sizes are HxW
everywhere (``resize``, messages, ``property``); a set holds one size.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from .datasets import IMAGE_EXTENSIONS, LabelError, list_identity_folders
from .image import ImageDecodeError, decode_image
from .parallel import imap_ordered
from .recordio import IRHeader, encode_record, pack

__all__ = ["PackError", "list_image_folder", "read_list_file", "pack_images", "pack_dataset", "RESIZE_MODES",
           "fit_image"]

RESIZE_MODES = ("stretch", "crop", "pad")  # the first is the default

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class PackError(ValueError):
    """The source of a pack run is unusable (unreadable images, missing identities...)."""


def list_image_folder(root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Tuple[Path, int]]:
    """``(path, label)`` for ``root/<identity>/<image>`` (see
    :func:`partial_fc.data.datasets.list_identity_folders`, which also says what it ignored)."""
    return list_identity_folders(root, extensions)[1]


def read_list_file(list_path: PathLike) -> List[Tuple[Path, int]]:
    """``(path, label)`` from ``path<TAB>label`` lines, grouped by label (stable).

    Labels must be integers covering 0..max: a label with no image raises LabelError.
    """
    return [(path, label) for path, label, _ in _read_list_lines(list_path)]


def _read_list_lines(list_path: PathLike) -> List[Tuple[Path, int, int]]:
    """``(path, label, line number)`` of :func:`read_list_file`, in its order."""
    list_path = Path(list_path)
    base = list_path.parent
    items = []
    seen: Dict[Path, int] = {}
    for lineno, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 2:
            hint = ""
            if len(fields) > 2 and fields[0].strip().isdigit() and Path(fields[-1]).suffix.lower() in IMAGE_EXTENSIONS:
                hint = " (this looks like an im2rec .lst, 'index<TAB>label<TAB>path': swap to 'path<TAB>label')"
            raise PackError(f"{list_path}:{lineno}: expected 'path<TAB>label', got {len(fields)} "
                            f"tab-separated field(s) in {line[:80]!r}{hint}")
        path_text, label_text = fields
        try:
            label = int(float(label_text))
            if float(label_text) != label or label < 0:
                raise ValueError
        except ValueError:
            raise PackError(f"{list_path}:{lineno}: label {label_text!r} is not a class index >= 0") from None
        path = Path(path_text)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise PackError(f"{list_path}:{lineno}: {path_text!r} has no image extension (accepted: "
                            f"{' '.join(IMAGE_EXTENSIONS)})")
        path = path if path.is_absolute() else base / path
        key = Path(os.path.normpath(path))
        if key in seen:  # it would be packed twice
            raise PackError(f"{list_path}:{lineno}: {path_text!r} is listed again (first on line {seen[key]})")
        seen[key] = lineno
        items.append((path, label, lineno))
    if not items:
        raise PackError(f"{list_path}: no entries")
    items.sort(key=lambda item: item[1])  # stable: keeps the file's order within a label
    present = {item[1] for item in items}
    top = items[-1][1]
    missing = [k for k in range(top + 1) if k not in present]
    if missing:
        raise LabelError(
            f"{list_path}: identity {missing[0]} has no images "
            f"({len(missing)} of the labels 0..{top} have none)"
        )
    return items


def parse_size(resize) -> Optional[Tuple[int, int]]:
    """(H, W) from an int S, a string "S" or "HxW", or an (H, W) pair."""
    if resize is None:
        return None
    if isinstance(resize, int):
        return (resize, resize)
    if isinstance(resize, str):
        try:
            vals = [int(p) for p in resize.lower().replace("x", ",").split(",") if p.strip()]
            if len(vals) not in (1, 2) or min(vals) < 1:
                raise ValueError
        except ValueError:
            raise PackError(f"resize: expected S or HxW (e.g. 112x112), got {resize!r}") from None
        return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    h, w = resize
    return int(h), int(w)


def fit_image(image: Image.Image, size: Tuple[int, int], mode: str = RESIZE_MODES[0]) -> Image.Image:
    """``image`` brought to ``size`` (H, W) by ``mode``: ``stretch`` resizes bilinearly (the aspect
    ratio changes when it differs), ``crop`` cuts the centred largest region of the target aspect
    ratio and resizes it, ``pad`` resizes to fit inside and centres it on black."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    h, w = size
    if image.size == (w, h):
        return image
    if mode == "stretch":
        return image.resize((w, h), Image.BILINEAR)
    iw, ih = image.size
    if mode == "crop":
        scale = max(w / iw, h / ih)
        cw, ch = round(w / scale), round(h / scale)
        left, top = (iw - cw) // 2, (ih - ch) // 2
        return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
    scale = min(w / iw, h / ih)
    inner = image.resize((max(1, round(iw * scale)), max(1, round(ih * scale))), Image.BILINEAR)
    canvas = Image.new(image.mode, (w, h))
    canvas.paste(inner, ((w - inner.size[0]) // 2, (h - inner.size[1]) // 2))
    return canvas


def _load_image(task):
    """Worker: (bytes, (H, W), None) for one image, or (None, None, error message).
    task = (path, size (H, W) or None, resize mode, quality, validate, reencode)."""
    path, size, mode, quality, validate, reencode = task
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return None, None, f"{path}: cannot read: {err}"
    try:
        if size is None and not reencode:
            if validate:
                arr = decode_image(data)
                return data, arr.shape[:2], None
            with Image.open(io.BytesIO(data)) as im:  # header only
                return data, (im.size[1], im.size[0]), None
        im = Image.fromarray(decode_image(data))
        if size is not None:
            im = fit_image(im, size, mode)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), (im.size[1], im.size[0]), None
    except ImageDecodeError as err:
        return None, None, f"{path}: {err}"
    except (OSError, ValueError) as err:  # Pillow: not an image it knows
        return None, None, f"{path}: not a readable image ({len(data)} bytes, {type(err).__name__})"


def pack_images(
    items: Sequence[Tuple[PathLike, int]],
    out_dir: PathLike,
    *,
    resize=None,
    resize_mode: str = RESIZE_MODES[0],
    quality: int = 95,
    validate: bool = False,
    reencode: bool = False,
    skip_bad: bool = False,
    workers: int = 1,
    progress: bool = True,
    prefix: str = "train",
    origins: Optional[Sequence[str]] = None,
) -> Dict:
    """Write ``(path, label)`` items (grouped by label, labels 0..C-1) as an InsightFace dataset.

    Record 0 is the header (label ``[N+1, N+1+C]``), keys 1..N the images (scalar labels, in the
    given order), keys N+1..N+C each identity's ``[first key, end key)``; ``property`` holds
    ``C,H,W`` (H, W from ``resize`` or the first image).

    ``validate`` decodes every image; ``resize`` (int S, (H, W) or "HxW"; ``resize_mode`` one of
    RESIZE_MODES, see :func:`fit_image`) and ``reencode`` re-encode as JPEG with ``quality``. An
    unreadable image, or without ``resize`` one whose size differs from the first image's,
    raises PackError naming it, or with ``skip_bad`` is left out and listed in the summary (an
    identity left without images still raises LabelError). ``origins`` (one per item, e.g.
    ``list.txt:12``) say in such messages where an item came from.
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
    size = parse_size(resize)
    if resize_mode not in RESIZE_MODES:
        raise PackError(f"resize mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    tasks = [(str(p), size, resize_mode, quality, validate, reencode) for p, _ in items]

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
            for i, ((path, label), (data, dims, err)) in enumerate(zip(items, results)):
                if err is not None and origins is not None:
                    err = f"{origins[i]}: {err}"
                if bar is not None:
                    bar.update(1)
                if err is None and first_size is not None and tuple(dims) != first_size:
                    err = (f"{path}: image is {dims[0]}x{dims[1]} (HxW) but the first image "
                           f"({first_path}) is {first_size[0]}x{first_size[1]}; a set holds one size: "
                           f"pass --resize HxW (resize=) to bring every image to it")
                if err is not None:
                    if not skip_bad:
                        raise PackError(f"unusable image: {err} (pfc-pack --skip-bad, skip_bad=True, leaves "
                                        "such images out)")
                    log.warning("leaving out %s", err)
                    bad.append(err)
                    continue
                if first_size is None:
                    first_size, first_path = tuple(dims), path
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
    height, width = size if size is not None else first_size
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
    """Pack a folder of identity folders, or a ``path<TAB>label`` list file, into ``out_dir``.
    The summary's ``ignored_files`` lists the files of a folder source that are not images."""
    source = Path(source)
    ignored: List[Path] = []
    origins = None
    if source.is_dir():
        _, items, ignored = list_identity_folders(source)
    else:
        lines = _read_list_lines(source)
        items = [(path, label) for path, label, _ in lines]
        origins = [f"{source}:{lineno}" for _, _, lineno in lines]
    summary = pack_images(items, out_dir, origins=origins, **kwargs)
    summary["ignored_files"] = [str(p) for p in ignored]
    return summary
