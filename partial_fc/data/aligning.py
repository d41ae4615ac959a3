"""Aligning raw photos to 112x112 ArcFace crops, folder to folder, ready for `pfc-pack`.

Each photo under the source folder is written to the same relative path under the output folder
(extension `.jpg`), warped onto `ARCFACE_TEMPLATE` from its five landmarks by the similarity
transform of `partial_fc.eval.alignment` (the one the IJB code uses). Landmarks come from a
landmark file (`path x1 y1 ... x5 y5` per line, path relative to the source folder, points in
`ARCFACE_TEMPLATE` order: image-left eye, image-right eye, nose tip, image-left and image-right
mouth corner; OpenCV pixel convention) or, without one, from `FaceDetector` (optional extra
`[align]`). Photos with no face, or with several (unless the largest is to be kept), are not
written and are listed in the report, as are unreadable ones and those under the source folder
that a landmark file has no line for.
"""
from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .datasets import IMAGE_EXTENSIONS
from .image import ImageDecodeError, decode_image
from .parallel import imap_ordered

__all__ = ["AlignError", "read_landmark_file", "list_photos", "align_folder", "LEFT_OUT"]

PathLike = Union[str, os.PathLike]


class AlignError(ValueError):
    """The source of an alignment run is unusable (malformed landmark file, clashing outputs...)."""


def read_landmark_file(path: PathLike) -> List[Tuple[str, np.ndarray, int]]:
    """`(relative photo path, float64 (5, 2) landmarks, line number)` for each line of a landmark
    file: `path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5`, whitespace- or tab-separated (the path may hold
    spaces: the last ten fields are the numbers). Raises AlignError naming the file and line of
    a malformed line or of a path listed twice."""
    path = Path(path)
    entries, seen = [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.strip().rsplit(None, 10)
        if len(fields) < 11:
            raise AlignError(f"{path}:{lineno}: expected 'path x1 y1 ... x5 y5' (11 fields), "
                             f"found {len(fields)}")
        name = fields[0].strip()
        try:
            points = np.array([float(v) for v in fields[1:]], dtype=np.float64).reshape(5, 2)
        except ValueError:
            raise AlignError(f"{path}:{lineno}: the last ten fields must be numbers, found "
                             f"{' '.join(fields[1:])!r}") from None
        if not np.all(np.isfinite(points)):
            raise AlignError(f"{path}:{lineno}: landmarks must be finite numbers")
        if name in seen:
            raise AlignError(f"{path}:{lineno}: {name!r} is listed again (first on line {seen[name]})")
        seen[name] = lineno
        entries.append((name, points, lineno))
    if not entries:
        raise AlignError(f"{path}: no landmark lines")
    return entries


def list_photos(root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Paths (relative to `root`, '/'-separated, sorted) of every image file under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"photo folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in exts)


@functools.lru_cache(maxsize=None)
def _detector(upsample: int, method: str):
    # One per process: each worker of the pool builds its own on first use.
    from .face_detection import FaceDetector

    return FaceDetector(upsample=upsample, method=method)


def _align_one(task) -> Dict:
    """Worker: align one photo and write it; returns its report entry."""
    from partial_fc.eval.alignment import align_face

    source, target, landmarks, (upsample, method), keep_largest, size, quality = task
    entry: Dict = {"photo": source}
    try:
        image = decode_image(Path(source).read_bytes())
    except (OSError, ImageDecodeError) as err:
        return {**entry, "status": "unreadable", "reason": str(err)}
    if landmarks is None:
        faces = _detector(upsample, method).detect(image)
        entry["faces"] = len(faces)
        if not faces:
            return {**entry, "status": "no_face"}
        if len(faces) > 1 and not keep_largest:
            return {**entry, "status": "several_faces"}
        landmarks = faces[0].landmarks
    crop = align_face(image, landmarks, size)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=quality)
    tmp = Path(target).with_name(Path(target).name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, target)
    entry.update(status="aligned", output=str(target), landmarks=np.round(landmarks, 2).tolist())
    return entry


ALIGN_REPORT_NAME = "align_report.json"  # pfc-align's default report, beside the crops
# Why a photo is not aligned: the report's list of each (no_landmarks: a photo under the source
# folder that the landmark file has no line for)
LEFT_OUT = ("no_face", "several_faces", "unreadable", "no_landmarks")


def align_folder(source: PathLike, output: PathLike, *, landmark_file: Optional[PathLike] = None,
                 keep_largest: bool = False, upsample: int = 1, method: str = "hog+cnn",
                 size: int = 112, quality: int = 95, workers: int = 1, progress: bool = True) -> Dict:
    """Align every photo under `source` (with a `landmark_file`: every photo it lists) into `output`.

    Without a landmark file `FaceDetector(upsample, method)` (extra `[align]`) finds the faces:
    a photo with one face is aligned; with several, only when `keep_largest` (the largest box is
    kept). Crops are `size` x `size` JPEGs at `quality`, at the photo's relative path with the
    suffix `.jpg`; an `output` inside `source` is not read as photos. `workers` processes.

    Returns the report: counts (`photos`: every photo under `source` and every one the landmark
    file lists), and per photo its `status` (`aligned`, or why not: one of LEFT_OUT), the number
    of `faces` found, and for aligned photos the `output` and the `landmarks` used (source
    pixels). Each of LEFT_OUT also lists its photos; `no_landmarks` holds the photos under
    `source` that the landmark file has no line for. Raises AlignError for a malformed landmark file or two
    photos that would be written to one output; DetectorUnavailable when detection is needed
    and the extra is not installed.
    """
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise FileNotFoundError(f"photo folder not found: {source}")
    inside = output.resolve().is_relative_to(source.resolve())  # leave earlier crops out
    photos = [name for name in list_photos(source)
              if not (inside and (source / name).resolve().is_relative_to(output.resolve()))]
    unlisted: List[str] = []
    if landmark_file is not None:
        jobs = [(name, points) for name, points, _ in read_landmark_file(landmark_file)]
        listed = {Path(name).as_posix() for name, _ in jobs}
        unlisted = [name for name in photos if name not in listed]  # left out, and said so
    else:
        from .face_detection import FaceDetector

        FaceDetector(upsample=upsample, method=method)  # fails here, once, when the extra is missing
        jobs = [(name, None) for name in photos]
    if not jobs:
        raise AlignError(f"{source}: no photos ({', '.join(IMAGE_EXTENSIONS)})")
    targets: Dict[str, str] = {}
    for name, _ in jobs:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise AlignError(f"{landmark_file}: {name!r} must be a path inside {source} "
                             "(relative, without '..'), as its crop goes to the same place in the output")
        target = Path(name).with_suffix(".jpg").as_posix()
        if target in targets:
            raise AlignError(f"{source / name} and {source / targets[target]} would both be "
                             f"written to {output / target}")
        targets[target] = name
    tasks = [(str(source / name), str(output / Path(name).with_suffix(".jpg")), points,
              (upsample, method), keep_largest, size, quality) for name, points in jobs]

    bar = None
    if progress:
        from partial_fc.progress import progress_bar

        bar = progress_bar(total=len(tasks), desc=f"aligning {source.name}", unit="photo")
    entries = []
    results = imap_ordered(_align_one, tasks, workers)
    try:
        for entry in results:
            entries.append(entry)
            if bar is not None:
                bar.update(1)
    finally:
        results.close()
        if bar is not None:
            bar.close()
    entries.extend({"photo": str(source / name), "status": "no_landmarks"} for name in unlisted)
    report: Dict = {"source": str(source), "output": str(output), "photos": len(entries)}
    for status in ("aligned",) + LEFT_OUT:
        chosen = [e for e in entries if e["status"] == status]
        report[status] = len(chosen) if status == "aligned" else [e["photo"] for e in chosen]
    report["several_faces_kept"] = [e["photo"] for e in entries
                                    if e["status"] == "aligned" and e.get("faces", 1) > 1]
    report["entries"] = entries
    return report
