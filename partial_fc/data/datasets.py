"""Face-recognition datasets: InsightFace / im2rec RecordIO files and image folders.

Items are ``(image, label)``; with ``transform=None`` the image is the decoded uint8 HxWx3 RGB
array, otherwise ``transform(image)``. A sample whose payload cannot be used (an undecodable image,
an unreadable image header, an image of the wrong size) is a *bad sample*:
``on_bad_image="raise"`` raises BadSampleError naming the file, key and offset;
``on_bad_image="skip"`` logs it, counts it in ``skipped`` and returns ``None`` in its place, so no
other sample is served twice (:func:`drop_skipped` is the collate function that leaves the ``None``
out of a batch). Damaged RecordIO framing always raises RecordIOError, and a label outside
``[0, num_classes)`` always raises LabelError: both mean the file (or its ``property``) is wrong,
not just one picture.

The image header's label is authoritative (as insightface's loader has it); the identity ranges
of an InsightFace header only give counts and a consistency check (``check_labels``), because
public packs (Glint360K) have ranges that disagree with correct labels.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .image import ImageDecodeError, decode_image
from .recordio import IR_SIZE, RecordIOError, RecordIOReader, first_label, unpack

__all__ = [
    "BadSampleError",
    "DatasetError",
    "DatasetNotFoundError",
    "LabelError",
    "class_count_verdict",
    "FaceRecordDataset",
    "ImageFolderDataset",
    "read_property",
    "list_identity_folders",
    "drop_skipped",
    "IMAGE_EXTENSIONS",
    "LABEL_CHECKS",
]

log = logging.getLogger(__name__)

# The image files read from identity folders and accepted in pfc-pack list files (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
_BAD_IMAGE_POLICIES = ("raise", "skip")
LABEL_CHECKS = ("off", "warn", "raise")
_LOGGED_DISAGREEMENTS = 20  # label/range disagreements logged one by one; later ones only counted

PathLike = Union[str, os.PathLike]


class BadSampleError(ValueError):
    """A sample's payload is unusable (undecodable image, unreadable header, mislabelled)."""


class DatasetError(ValueError):
    """A data set as a whole cannot be used (its layout, metadata or image size); the message
    names the file and what was expected against what was found."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The files of a data set are not where they were looked for."""


class LabelError(DatasetError):
    """A label lies outside [0, num_classes) or the dataset's class metadata is inconsistent."""


def read_property(path: PathLike) -> Tuple[int, int, int]:
    """Parse an InsightFace ``property`` file ``num_classes,height,width``."""
    path = Path(path)
    text = path.read_text().strip()
    try:
        fields = [int(x) for x in text.split(",")]
        if len(fields) != 3 or fields[0] < 0:
            raise ValueError
    except ValueError:
        raise LabelError(f"{path}: malformed property {text[:60]!r} (expected 'num_classes,H,W')") from None
    return fields[0], fields[1], fields[2]


def list_identity_folders(root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    """``(class names, [(path, label)], ignored)`` of ``root/<identity>/<image>``: identities in
    sorted name order, images by file name. What the layout leaves out is ignored, returned and
    logged so callers can report it: files whose extension is not in ``extensions``
    (``Thumbs.db``, ``.txt``), files beside the identity folders, and folders inside them (with
    the count of images they hold). Raises FileNotFoundError without ``root``, LabelError naming
    the folder when there are no identity folders or an identity has no images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)
    entries = sorted(root.iterdir())
    classes = [p.name for p in entries if p.is_dir()]
    if not classes:
        hint = ""
        if any(root.glob("*.rec")):
            hint = " (it holds RecordIO: train on it with data=rec data.root=" + str(root) + ")"
        raise LabelError(f"{root}: no identity folders (expected {root}/<identity>/<image>){hint}")
    samples: List[Tuple[Path, int]] = []
    ignored: List[Path] = [p for p in entries if not p.is_dir()]
    for label, name in enumerate(classes):
        inside = sorted((root / name).iterdir())
        files = [p for p in inside if p.is_file()]
        images = [p for p in files if p.suffix.lower() in exts]
        ignored.extend(p for p in inside if p not in images)
        if not images:
            raise LabelError(f"{root / name}: identity {label} ({name!r}) has no images "
                             f"({len(files)} other file(s); image extensions: {' '.join(exts)})")
        samples.extend((p, label) for p in images)
    if ignored:
        nested = sum(1 for p in ignored if p.is_dir() for q in p.rglob("*") if q.suffix.lower() in exts)
        log.warning("%s: %d file(s) or folder(s) outside the layout <identity>/<image> ignored, e.g. %s "
                    "(image extensions: %s)%s", root, len(ignored), ignored[0], " ".join(exts),
                    f"; {nested} image(s) lie in ignored folders" if nested else "")
    return classes, samples, ignored


def drop_skipped(batch):
    """Collate function for a dataset with ``on_bad_image="skip"``: leaves out the ``None`` of
    skipped samples and collates the rest with PyTorch's default (the batch may be smaller)."""
    from torch.utils.data import default_collate

    kept = [item for item in batch if item is not None]
    if not kept:
        raise BadSampleError(f"all {len(batch)} samples of a batch were bad and skipped (see the warnings "
                             "naming them): the data cannot be trained on")
    return default_collate(kept)


def _label_to_class(label) -> Optional[int]:
    """Class index from an IRHeader label (float, or array whose first element is the class);
    None when it is not a finite integral value (a damaged record)."""
    if isinstance(label, np.ndarray):
        if label.size == 0:
            return None
        label = label.flat[0]
    value = float(label)
    if not math.isfinite(value) or value != int(value):
        return None
    return int(value)


class _BadSamplePolicy:
    """Shared raise/skip handling. Subclasses implement ``_load(index)``."""

    def _init_policy(self, on_bad_image: str, image_size=None):
        if on_bad_image not in _BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {_BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        if image_size is not None:
            image_size = tuple(int(v) for v in image_size)
            if len(image_size) != 2 or min(image_size) < 1:
                raise ValueError(f"image_size must be (height, width), got {image_size!r}")
        self.required_size = image_size
        self.skipped = 0  # per process: each DataLoader worker counts its own
        self.skipped_indices: List[int] = []

    def __getitem__(self, index: int):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        try:
            return self._load(index)
        except BadSampleError as err:
            if self.on_bad_image == "raise":
                raise
            self.skipped += 1
            self.skipped_indices.append(index)
            log.warning("skipping bad sample (index %d): %s", index, err)
            return None

    def _load(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_size(self, image, where: str) -> None:
        """A decoded image of another size than ``image_size`` is a bad sample (a batch cannot
        hold it; the models take one size)."""
        size = self.required_size
        if size is not None and tuple(image.shape[:2]) != size:
            raise BadSampleError(
                f"{where}: image is {image.shape[0]}x{image.shape[1]}, expected {size[0]}x{size[1]} "
                f"(HxW; repack with pfc-pack --resize {size[0]}x{size[1]}, or for raw photos "
                f"align them first with pfc-align)"
            )


# range labels not read yet, and unreadable (no label is this small)
_UNREAD, _UNKNOWN = np.iinfo(np.int64).min, np.iinfo(np.int64).min + 1


def class_count_verdict(rec_path, claims: Dict[str, int], counted: Optional[int],
                        identity_records: Optional[int] = None, requested: Optional[str] = None):
    """``(num_classes, errors, warnings)`` of a RecordIO set from what each source says.

    ``claims``: source -> class count (``"data.num_classes=4"``, a ``property`` path), the key
    ``requested`` among them being the caller's request; ``counted``: max label + 1 (None: the
    labels were not read); ``identity_records``: C of an InsightFace header. The labels decide:
    a request or a property that disagrees with them is an error (a property only a warning when
    the request agrees with the labels). Without ``counted`` the claims give the count when they
    agree (else it is None). Identity records that outnumber the classes are a warning (surplus
    records: an identity split over several records, as in Glint360K), as are fewer records
    than classes.
    """
    errors: List[str] = []
    notes: List[str] = []
    if counted is None:
        values = set(claims.values())
        num_classes = values.pop() if len(values) == 1 else None
        source = " and ".join(claims)
    else:
        num_classes, source = counted, f"max label {counted - 1} + 1"
        wrong = {name: value for name, value in claims.items() if value != counted}
        request_agrees = requested is not None and requested not in wrong
        for name, value in wrong.items():
            if name == requested:
                errors.append(f"{requested} but the dataset has {counted} classes (the labels of "
                              f"{rec_path}: max label {counted - 1} + 1)")
            elif request_agrees:
                notes.append(f"{name}: says {value} classes but the labels of {rec_path} say {counted} "
                             f"(as does {requested}): the labels are used; correct the property file")
            else:
                errors.append(f"{name}: says {value} classes but the labels of {rec_path} say {counted} "
                              f"(max label {counted - 1} + 1); correct it, or remove it to count the labels")
    if num_classes is not None and identity_records is not None and identity_records != num_classes:
        if identity_records > num_classes:
            notes.append(f"{rec_path}: the header holds {identity_records} identity records for "
                         f"{num_classes} classes ({source}): {identity_records - num_classes} surplus "
                         "identity record(s), e.g. an identity split over several records (as in "
                         "Glint360K); the image labels are used")
        else:
            notes.append(f"{rec_path}: the header holds {identity_records} identity records for "
                         f"{num_classes} classes ({source}): {num_classes - identity_records} class(es) "
                         "have no identity record; the image labels are used")
    return num_classes, errors, notes


class FaceRecordDataset(_BadSamplePolicy):
    """Images and labels from an MXNet RecordIO face dataset.

    ``root`` is a folder with ``train.rec`` and ``train.idx`` (and, optionally, ``property``), or
    the path of a ``.rec`` file. Two layouts are recognised:

    - InsightFace: record 0 holds a header (flag > 0, empty payload, label ``[N+1, N+1+C]``);
      images are keys 1..N, and keys N+1..N+C hold C identity records, each a ``[first key, end
      key)`` range. The image's own label is used; ``check_labels`` (one of LABEL_CHECKS) says
      what an image whose label differs from that of the first image of its range does: ``off``
      nothing, ``warn`` a logged warning (counted in ``label_disagreements``), ``raise`` a
      LabelError naming the key, label and range.
    - im2rec: every key is an image, in key order.

    ``num_classes`` is the labels' count (max label + 1). The ``num_classes`` argument (named
    ``num_classes_key`` in messages) and the ``property`` file give it without reading the
    images' labels when they agree (and, InsightFace layout, the label of the first image of
    each identity range does not contradict them: C reads, not N); otherwise every label is
    read once (:meth:`count_classes`, record headers only) and :func:`class_count_verdict`
    decides: a request or property that disagrees with them raises LabelError (a property is
    only warned about when the request agrees with the labels); identity records that outnumber
    the classes (as in Glint360K) are a logged warning. With ``count_classes=False`` no label is
    read here and ``num_classes`` is None where only the labels could tell it.

    Without ``train.idx`` the index is built by one scan of the file (keys = record order, as
    MXNet writes them), and saved beside it with ``save_index=True``.
    ``return_key=True`` makes items ``(image, label, key)``. With ``image_size=(h, w)`` a decoded
    image of another size is a bad sample (``on_bad_image`` decides), named by key and offset; a
    ``property`` of another size raises DatasetError at once.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Optional[Callable] = None,
        *,
        on_bad_image: str = "raise",
        num_classes: Optional[int] = None,
        check_labels: str = "warn",
        return_key: bool = False,
        name: str = "train",
        save_index: bool = False,
        image_size: Optional[Tuple[int, int]] = None,
        num_classes_key: str = "num_classes",
        count_classes: bool = True,
    ):
        self._init_policy(on_bad_image, image_size)
        root = Path(root)
        if root.suffix == ".rec" and root.is_file():
            rec_path, root = root, root.parent
            name = rec_path.stem
        else:
            rec_path = root / f"{name}.rec"
        idx_path = rec_path.with_suffix(".idx")
        if not rec_path.is_file():
            hint = ""
            if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
                hint = f" ({root} holds folders: for one folder per identity, train with data=folder)"
            raise DatasetNotFoundError(f"no RecordIO file {rec_path}{hint}")
        self.root = root
        self.transform = transform
        self.return_key = return_key
        if check_labels not in LABEL_CHECKS:
            raise ValueError(f"check_labels must be one of {LABEL_CHECKS}, got {check_labels!r}")
        self.check_labels = check_labels
        self.label_disagreements = 0  # per process, like ``skipped``
        if idx_path.is_file():
            self.reader = RecordIOReader(rec_path, idx_path)
        else:
            log.warning("%s: no index %s; scanning the file (keys = record order)", rec_path, idx_path.name)
            self.reader = RecordIOReader(rec_path, None, build_index=True)
            if save_index:
                self.reader.save_index(idx_path)
        prop_path = root / "property"
        self.property_path = prop_path if prop_path.is_file() else None
        prop = read_property(prop_path) if self.property_path else None
        self.image_size = (prop[1], prop[2]) if prop else None
        if self.required_size is not None and self.image_size not in (None, self.required_size):
            h, w = self.required_size
            raise DatasetError(
                f"{prop_path}: images are {prop[1]}x{prop[2]} (HxW) but {h}x{w} are needed; repack with "
                f"pfc-pack --resize {h}x{w}, or for raw photos align them first with pfc-align "
                f"(112x112 ArcFace crops) and pack those"
            )

        header = self._read_layout_header()
        self._key_class: Optional[np.ndarray] = None
        self.identity_ranges: Optional[np.ndarray] = None
        self.identity_records: Optional[int] = None  # C of an InsightFace header
        if header is not None:
            self.layout = "insightface"
            first_identity_key, end_identity_key = header
            self.keys = np.arange(1, first_identity_key, dtype=np.int64)
            self.identity_records = end_identity_key - first_identity_key
            self._check_header_keys(end_identity_key)
            self._load_identity_ranges(first_identity_key, end_identity_key)
        else:
            self.layout = "im2rec"
            self.keys = np.sort(self.reader.key_array)
        self.class_claims: Dict[str, int] = {}  # who says how many classes, before any label
        requested = None if num_classes is None else f"{num_classes_key}={num_classes}"
        if requested is not None:
            self.class_claims[requested] = int(num_classes)
        if prop is not None:
            self.class_claims[str(prop_path)] = prop[0]
        counted = self._count_if_claims_disagree() if count_classes else None
        self.num_classes, errors, notes = class_count_verdict(
            self.reader.rec_path, self.class_claims, counted, self.identity_records, requested)
        if errors:
            raise LabelError(errors[0])
        for note in notes:
            log.warning("%s", note)

    # ------------------------------------------------------------------ metadata
    def _read_layout_header(self):
        """(first identity key, end identity key) for the InsightFace layout, else None."""
        if 0 not in self.reader:
            return None
        raw = self.reader.read(0)
        try:
            head, payload = unpack(raw)
        except ValueError:
            return None
        if head.flag < 2 or len(payload) != 0:
            return None
        first, end = float(head.label[0]), float(head.label[1])
        if first != int(first) or end != int(end) or not 1 <= first <= end:
            raise LabelError(
                f"{self.reader.rec_path}: key 0: header record label {head.label.tolist()} is not "
                "[first identity key, end identity key)"
            )
        return int(first), int(end)

    def _check_header_keys(self, end_key: int) -> None:
        """Every key 1..end-1 the header names is indexed; indexed keys outside 0..end-1 are not
        used, and said so."""
        keys = self.reader.key_array
        missing = np.setdiff1d(np.arange(1, end_key), keys)
        if missing.size:
            raise RecordIOError(
                f"key not found in {self.reader.idx_path or 'the scanned index'} "
                f"({missing.size} of the header's keys 1..{end_key - 1} are missing)",
                self.reader.rec_path,
                key=int(missing[0]),
            )
        outside = keys[(keys < 0) | (keys >= end_key)]
        if outside.size:
            log.warning("%s: %d indexed record(s) lie outside the header's keys 0..%d and are not used "
                        "(e.g. key %d)", self.reader.rec_path, outside.size, end_key - 1, int(outside[0]))

    def _load_identity_ranges(self, first_key: int, end_key: int):
        n_images = first_key - 1
        ranges = np.zeros((end_key - first_key, 2), dtype=np.int64)
        key_class = np.full(n_images, -1, dtype=np.int32)
        rec = self.reader.rec_path
        for j, key in enumerate(range(first_key, end_key)):
            try:
                head, _ = unpack(self.reader.read(key))
            except ValueError as err:
                if isinstance(err, RecordIOError):
                    raise
                raise RecordIOError(f"unreadable identity record of class {j}: {err}", rec, key=key) from None
            if head.flag < 2:
                raise LabelError(f"{rec}: key {key}: identity record of class {j} has no [start, end) label")
            start, end = int(head.label[0]), int(head.label[1])
            if end <= start:
                raise LabelError(
                    f"{rec}: key {key}: identity {j} has no images (range [{start}, {end}))"
                )
            if start < 1 or end > first_key:
                raise LabelError(
                    f"{rec}: key {key}: identity {j} range [{start}, {end}) lies outside the image "
                    f"keys [1, {first_key})"
                )
            ranges[j] = start, end
            key_class[start - 1 : end - 1] = j
        self.identity_ranges = ranges
        self._key_class = key_class
        self._range_label = np.full(len(ranges), _UNREAD, dtype=np.int64)  # read on demand

    def _count_if_claims_disagree(self) -> Optional[int]:
        """Max label + 1 (:meth:`count_classes`) unless the claims agree on one count, which the
        first images of the identity ranges (InsightFace layout: C reads, not N) do not contradict;
        else None."""
        claimed = set(self.class_claims.values())
        if len(claimed) == 1:
            if self.identity_ranges is None:
                return None
            claim = claimed.pop()
            starts = [self.range_label(j) for j in range(len(self.identity_ranges))]
            known = [c for c in starts if c is not None]  # an unreadable record says so when read
            top = max(known, default=-1) + 1
            if top == claim or (top < claim and len(known) < len(starts)):
                return None
        return self.count_classes()

    def count_classes(self) -> int:
        """Max label + 1 over every image, by one pass that reads each record's header only.
        Raises LabelError naming the key of a label that is not a class index."""
        top = -1
        for key in self.keys.tolist():
            label = self._head_label(key)
            cls = _label_to_class(label)
            if cls is None or cls < 0:
                raise LabelError(f"{self.reader.rec_path}: key {key}: label {label} is not a class index")
            top = max(top, cls)
        log.info("%s: read the labels of %d images: %d classes (max label + 1)", self.reader.rec_path,
                 self.keys.size, top + 1)
        return top + 1

    def _head_label(self, key: int):
        """The IRHeader label of record ``key``, read without its payload."""
        try:
            return first_label(self.reader.read_head(key, IR_SIZE + 4))
        except RecordIOError:
            raise
        except ValueError as err:
            raise BadSampleError(self._where(key) + f": unreadable image header: {err}") from None

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return int(self.keys.size)

    def key_of(self, index: int) -> int:
        """RecordIO key of item ``index``."""
        return int(self.keys[index])

    def read_record(self, index: int):
        """``(IRHeader, payload bytes)`` of item ``index`` without decoding."""
        key = int(self.keys[index])
        try:
            return unpack(self.reader.read(key))
        except RecordIOError:
            raise
        except ValueError as err:
            raise BadSampleError(self._where(key) + f": unreadable image header: {err}") from None

    def _where(self, key: int) -> str:
        try:
            offset = self.reader.offset_of(key)
        except RecordIOError:
            offset = "?"
        return f"{self.reader.rec_path}: key {key}: offset {offset}"

    def label_of(self, index: int) -> int:
        """Class of item ``index`` (reads the record's header, decodes nothing)."""
        head, _ = self.read_record(index)
        return self._checked_class(int(self.keys[index]), head.label)

    def _checked_class(self, key: int, label) -> int:
        cls = _label_to_class(label)
        if cls is None:
            raise BadSampleError(self._where(key) + f": label {label} is not a class index")
        if not 0 <= cls < self.num_classes:
            said = " and ".join(self.class_claims) or "the labels"
            raise LabelError(self._where(key) + f": label {cls} outside [0, {self.num_classes}) "
                             f"(the class count of {said})")
        if self.check_labels != "off" and self._key_class is not None:
            why = self.range_disagreement(key, cls)
            if why is not None:
                self._range_disagreement(key, why)
        return cls

    def range_label(self, identity: int) -> Optional[int]:
        """The class of identity record ``identity``: the label of the first image of its range
        (read once per process, when first needed); None when that record is unreadable or its
        label not a class index (that record's own read says so; its range is not checked)."""
        known = int(self._range_label[identity])
        if known == _UNREAD:
            try:
                cls = _label_to_class(self._head_label(int(self.identity_ranges[identity, 0])))
            except (RecordIOError, BadSampleError):
                cls = None
            known = _UNKNOWN if cls is None else cls
            self._range_label[identity] = known
        return None if known == _UNKNOWN else known

    def range_disagreement(self, key: int, label: int) -> Optional[str]:
        """Why ``label`` of image ``key`` disagrees with the header's identity ranges (the first
        image of the range holding ``key`` has another label), or None."""
        if self._key_class is None:
            return None
        identity = int(self._key_class[key - 1])
        if identity < 0:
            return f"label {label}, but no identity range holds key {key}"
        expected = self.range_label(identity)
        if expected is None or expected == label:
            return None
        start, end = (int(v) for v in self.identity_ranges[identity])
        return (f"label {label}, but key {key} lies in identity {identity}'s range [{start}, {end}), "
                f"whose first image (key {start}) has label {expected} (the label is used)")

    def _range_disagreement(self, key: int, why: str) -> None:
        message = self._where(key) + ": " + why
        if self.check_labels == "raise":
            raise LabelError(message + "; data.label_check=warn trains on the labels and warns")
        self.label_disagreements += 1
        if self.label_disagreements <= _LOGGED_DISAGREEMENTS:
            log.warning("%s", message)
        elif self.label_disagreements == _LOGGED_DISAGREEMENTS + 1:
            log.warning("%s: more labels disagree with the identity ranges; no longer logged one by one "
                        "(pfc-inspect lists them all)", self.reader.rec_path)

    def _load(self, index: int):
        key = int(self.keys[index])
        head, payload = self.read_record(index)
        label = self._checked_class(key, head.label)
        try:
            image = decode_image(payload)
        except ImageDecodeError as err:
            raise BadSampleError(self._where(key) + f": {err}") from None
        self._check_size(image, self._where(key))
        if self.transform is not None:
            image = self.transform(image)
        return (image, label, key) if self.return_key else (image, label)

    def __repr__(self):
        return (
            f"FaceRecordDataset({str(self.root)!r}, layout={self.layout}, images={len(self)}, "
            f"num_classes={self.num_classes})"
        )


class ImageFolderDataset(_BadSamplePolicy):
    """Images in one sub-folder per identity: ``root/<identity>/<image>``.

    Identities are the sub-folders in sorted name order (class 0, 1, ...); images within an
    identity are sorted by file name (:func:`list_identity_folders`; other files are listed in
    ``ignored_files``). An identity folder without images raises LabelError.
    ``return_key=True`` makes items ``(image, label, path)``. With ``image_size=(h, w)`` a decoded
    image of another size is a bad sample (``on_bad_image`` decides), named by its path.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Optional[Callable] = None,
        *,
        on_bad_image: str = "raise",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        return_key: bool = False,
        image_size: Optional[Tuple[int, int]] = None,
    ):
        self._init_policy(on_bad_image, image_size)
        self.root = Path(root)
        self.transform = transform
        self.return_key = return_key
        self.classes, self.samples, self.ignored_files = list_identity_folders(self.root, extensions)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int):
        path, label = self.samples[index]
        try:
            image = decode_image(path.read_bytes())
        except ImageDecodeError as err:
            raise BadSampleError(f"{path}: {err}") from None
        self._check_size(image, str(path))
        if self.transform is not None:
            image = self.transform(image)
        return (image, label, str(path)) if self.return_key else (image, label)

    def __repr__(self):
        return f"ImageFolderDataset({str(self.root)!r}, images={len(self)}, num_classes={self.num_classes})"
