"""Verification `.bin` sets made from a folder of images and a pairs list.

Two pairs layouts are read, told apart by the first non-empty line:

- LFW's `pairs.txt` (Huang et al., 2007, "Labeled Faces in the Wild", README of the set): a
  header of one or two integers (`pairs per kind`, or `folds<TAB>pairs per kind`), then matched
  pairs `name<TAB>n1<TAB>n2` and mismatched pairs `name1<TAB>n1<TAB>name2<TAB>n2`; image n of a
  person is `name/name_000n.jpg` (4 digits) under the image root. With a header the file must
  hold `folds * 2 * pairs` pair lines.
- A plain list: `path1 path2 label` per line, label 1 (same identity) or 0, paths relative to
  the image root (or absolute); with a tab in the line, fields are tab-separated (paths may
  then hold spaces), otherwise whitespace-separated.

Pairs keep the file's order, so LFW's folds stay contiguous as the 10-fold protocol of
`partial_fc.eval.metrics` expects. Lines starting with `#` are comments.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image

from partial_fc.data.image import ImageDecodeError, decode_image
from partial_fc.data.parallel import imap_ordered

from .bin_format import write_bin

__all__ = ["Pair", "PairsError", "read_pairs", "prepare_image", "make_bin"]

PathLike = Union[str, os.PathLike]

_TRUE_LABELS = ("1", "true", "same")
_FALSE_LABELS = ("0", "false", "diff", "different")


class PairsError(ValueError):
    """A pairs list is malformed or names images that are not there."""


@dataclass(frozen=True)
class Pair:
    """One pair: two image paths, whether they show one identity, and the list line it came from."""
    first: Path
    second: Path
    issame: bool
    line: int


def _int_field(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def _lfw_image(root: Path, name: str, number: str, ext: str, where: str) -> Path:
    index = _int_field(number)
    if index is None or index < 1:
        raise PairsError(f"{where}: image number {number!r} is not an integer >= 1")
    return root / name / f"{name}_{index:04d}{ext}"


def _read_lfw(lines, root: Path, source: str, header: List[int], ext: str) -> List[Pair]:
    pairs = []
    for lineno, fields in lines:
        where = f"{source}:{lineno}"
        if len(fields) == 3:
            name, n1, n2 = fields
            pairs.append(Pair(_lfw_image(root, name, n1, ext, where),
                              _lfw_image(root, name, n2, ext, where), True, lineno))
        elif len(fields) == 4:
            name1, n1, name2, n2 = fields
            pairs.append(Pair(_lfw_image(root, name1, n1, ext, where),
                              _lfw_image(root, name2, n2, ext, where), False, lineno))
        else:
            raise PairsError(f"{where}: expected 'name n1 n2' (matched) or 'name1 n1 name2 n2' "
                             f"(mismatched) as in LFW's pairs.txt, found {len(fields)} fields")
    folds, per_kind = (1, header[0]) if len(header) == 1 else header
    if len(pairs) != 2 * folds * per_kind:
        raise PairsError(f"{source}: the header announces {folds} fold(s) of {per_kind} matched and "
                         f"{per_kind} mismatched pairs ({2 * folds * per_kind} lines), "
                         f"found {len(pairs)} pair lines")
    return pairs


def _read_plain(lines, root: Path, source: str) -> List[Pair]:
    pairs = []
    for lineno, fields in lines:
        where = f"{source}:{lineno}"
        if len(fields) != 3:
            raise PairsError(f"{where}: expected 'path1 path2 0|1', found {len(fields)} fields "
                             "(separate with tabs when paths hold spaces)")
        first, second, label = fields
        if label.lower() in _TRUE_LABELS:
            same = True
        elif label.lower() in _FALSE_LABELS:
            same = False
        else:
            raise PairsError(f"{where}: label {label!r} is not 1 (same identity) or 0 (different)")
        pairs.append(Pair(root / first, root / second, same, lineno))
    return pairs


def read_pairs(pairs_path: PathLike, image_root: PathLike, ext: str = ".jpg") -> List[Pair]:
    """Pairs from an LFW `pairs.txt` or a plain `path1 path2 0|1` list (see the module doc).

    `ext` is the file extension of LFW-layout images. Returns the pairs in file order; raises
    PairsError naming the file and line of the first malformed line, or when an LFW header's
    count does not match the pair lines. Does not check that the images exist (`make_bin` does).
    """
    pairs_path, root = Path(pairs_path), Path(image_root)
    lines: List[Tuple[int, List[str]]] = []
    for lineno, line in enumerate(pairs_path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.strip().split("\t") if "\t" in line else line.split()
        lines.append((lineno, [f.strip() for f in fields]))
    if not lines:
        raise PairsError(f"{pairs_path}: no pairs")
    first = [_int_field(f) for f in lines[0][1]]
    if len(first) <= 2 and all(v is not None and v > 0 for v in first):
        return _read_lfw(lines[1:], root, str(pairs_path), first, ext)
    return _read_plain(lines, root, str(pairs_path))


def _center_crop(image: Image.Image, crop: Tuple[int, int]) -> Image.Image:
    height, width = crop
    if width > image.width or height > image.height:
        raise ValueError(f"crop {height}x{width} (HxW) is larger than the {image.height}x{image.width} image")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def prepare_image(data: bytes, size: Tuple[int, int] = (112, 112),
                  crop: Optional[Tuple[int, int]] = None, quality: int = 95) -> bytes:
    """Encoded image bytes as they go into a `.bin`: centre-cropped to `crop` (height, width)
    when given, then resized bilinearly to `size` (height, width) and JPEG-encoded at `quality`.
    An image already of `size` with no crop keeps its bytes unchanged (no second JPEG loss).
    Raises ImageDecodeError for undecodable data, ValueError for a crop larger than the image."""
    array = decode_image(data)
    height, width = size
    if crop is None and array.shape[:2] == (height, width):
        return data
    image = Image.fromarray(array)
    if crop is not None:
        image = _center_crop(image, crop)
    if image.size != (width, height):  # Pillow's sizes are (width, height)
        image = image.resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _prepare_file(task):
    """Worker: (bytes, None) or (None, error text) for one image file."""
    path, size, crop, quality = task
    try:
        return prepare_image(Path(path).read_bytes(), size, crop, quality), None
    except (OSError, ImageDecodeError, ValueError) as err:
        return None, str(err)


def make_bin(image_root: PathLike, pairs_path: PathLike, output: PathLike, *,
             size: Tuple[int, int] = (112, 112), crop: Optional[Tuple[int, int]] = None,
             quality: int = 95, ext: str = ".jpg", workers: int = 1,
             progress: bool = True) -> Dict:
    """Write the insightface `.bin` of the pairs in `pairs_path` (see `read_pairs`), images read
    under `image_root` and prepared by `prepare_image(size, crop, quality)`.

    Every image is checked before anything is written: missing or unreadable images raise
    PairsError listing each one with the pairs-list line that names it. Returns a summary dict
    (output path, pair counts, image size).
    """
    pairs_path = Path(pairs_path)
    pairs = read_pairs(pairs_path, image_root, ext=ext)
    missing = [f"{pairs_path}:{pair.line}: {path} not found"
               for pair in pairs for path in (pair.first, pair.second) if not path.is_file()]
    if missing:
        raise PairsError(_listing(f"{len(missing)} image(s) of the pairs list are missing"
                                  + _align_hint(Path(image_root)), missing))

    paths = [path for pair in pairs for path in (pair.first, pair.second)]
    lines = [pair.line for pair in pairs for _ in range(2)]
    tasks = [(str(p), tuple(size), crop, quality) for p in paths]
    bar = None
    if progress:
        from partial_fc.progress import progress_bar

        bar = progress_bar(total=len(tasks), desc=f"making {Path(output).name}", unit="img")
    images: List[bytes] = []
    bad: List[str] = []
    results = imap_ordered(_prepare_file, tasks, workers, chunksize=16)
    try:
        for path, line, (data, err) in zip(paths, lines, results):
            if bar is not None:
                bar.update(1)
            if err is not None:
                bad.append(f"{pairs_path}:{line}: {path}: {err}")
            else:
                images.append(data)
    finally:
        results.close()
        if bar is not None:
            bar.close()
    if bad:
        raise PairsError(_listing(f"{len(bad)} image(s) of the pairs list cannot be used", bad))
    issame = [pair.issame for pair in pairs]
    out = write_bin(output, images, issame)
    return {"output": str(out), "num_pairs": len(pairs), "num_same": sum(issame),
            "num_different": len(pairs) - sum(issame), "image_size": [size[0], size[1]]}


def _align_hint(image_root: Path) -> str:
    """Where to look when `image_root` is pfc-align's output (it holds its report)."""
    from partial_fc.data.aligning import ALIGN_REPORT_NAME

    report = image_root / ALIGN_REPORT_NAME
    if not report.is_file():
        return ""
    return (f" ({report} lists the photos pfc-align left out and why; photos with several faces "
            f"align with pfc-align --keep-largest)")


def _listing(title: str, entries: Sequence[str], shown: int = 20) -> str:
    more = f"\n  ... and {len(entries) - shown} more" if len(entries) > shown else ""
    return title + ":\n  " + "\n  ".join(entries[:shown]) + more
