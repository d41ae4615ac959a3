"""Summaries and integrity checks of RecordIO face datasets: the engine of `pfc-inspect`
(`partial_fc.tools.inspect`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np

from .datasets import FaceRecordDataset, _label_to_class, class_count_verdict, read_property
from .image import ImageDecodeError, decode_image
from .recordio import RecordIOError, unpack

__all__ = ["inspect_dataset", "images_per_identity_histogram", "format_report", "exit_status"]

PathLike = Union[str, os.PathLike]


def images_per_identity_histogram(counts: np.ndarray) -> List[Dict]:
    """Identities binned by their image count in power-of-two buckets: [{lo, hi, identities}]."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return []
    top = int(counts.max())
    rows = []
    lo = 0
    for hi in [0] + [2 ** k for k in range(0, max(top, 1).bit_length() + 1)]:
        if hi < lo:
            continue
        n = int(((counts >= lo) & (counts <= hi)).sum())
        if n or lo <= top:
            rows.append({"lo": lo, "hi": hi, "identities": n})
        lo = hi + 1
        if lo > top:
            break
    nonzero = [i for i, r in enumerate(rows) if r["identities"]]
    return rows[nonzero[0] : nonzero[-1] + 1] if nonzero else rows


def _rec_paths(root: Path):
    if root.suffix == ".rec":
        return root, root.with_suffix(".idx"), root.parent / "property"
    return root / "train.rec", root / "train.idx", root / "property"


def inspect_dataset(root: PathLike, verify: bool = False, progress: bool = True,
                    max_errors: Optional[int] = None) -> Dict:
    """Describe a RecordIO face dataset; with ``verify``, read and decode every record.

    Returns a dict: layout, header, counts, label range, ``num_classes`` (max label + 1, what
    training takes; None when no label could be read), ``class_claims`` (what the property file
    says), ``identity_records`` (InsightFace header: the records, and the labels split over
    several of them), images-per-identity histogram (counted from the images' labels),
    ``broken``: one entry ``{key, offset, error}`` per record that cannot be read, unpacked or
    labelled (with ``verify`` also decoded, and of the property file's HxW),
    ``class_count_errors``: what makes training refuse the class count (a property that
    disagrees with the labels), ``warnings`` (surplus identity records), and
    ``range_disagreements``: one entry ``{key, offset, warning}`` per image whose label differs
    from that of the first image of the identity range holding its key (a warning: training
    uses the label). Framing damage that stops the dataset from opening at all is ``fatal``.
    The labels are read once.
    """
    root = Path(root)
    rec_path, idx_path, prop_path = _rec_paths(root)
    report: Dict = {"rec": str(rec_path), "idx": str(idx_path) if idx_path.is_file() else None}
    report["property"] = list(read_property(prop_path)) if prop_path.is_file() else None
    try:
        ds = FaceRecordDataset(rec_path, check_labels="off", count_classes=False)  # counted below
    except FileNotFoundError:
        raise
    except (RecordIOError, ValueError) as err:
        report["fatal"] = str(err)
        return report
    reader = ds.reader
    size = ds.image_size  # (H, W) from the property file, if any
    report.update(
        layout=ds.layout,
        num_records=len(reader),
        num_images=len(ds),
        file_bytes=reader.file_size,
        class_claims=ds.class_claims,
    )
    if ds.layout == "insightface":
        head, _ = unpack(reader.read(0))
        report["header"] = {"flag": head.flag, "label": [float(x) for x in head.label]}

    labels = np.full(len(ds), -1, dtype=np.int64)
    broken: List[Dict] = []
    disagreements: List[Dict] = []
    iterator = range(len(ds))
    complete = True  # every label read (not stopped at max_errors)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(iterator, desc="verifying" if verify else "reading labels", unit="rec", leave=False, disable=None)
        iterator = bar
    for i in iterator:
        key = ds.key_of(i)
        try:
            offset = reader.offset_of(key)
        except RecordIOError as err:
            broken.append({"key": key, "offset": None, "error": str(err)})
            continue
        try:
            head, payload = unpack(reader.read(key))
            cls = _label_to_class(head.label)
            if cls is None or cls < 0:
                raise ValueError(f"label {head.label} is not a class index")
            if verify:
                image = decode_image(payload)
                if size is not None and tuple(image.shape[:2]) != size:
                    raise ValueError(f"image is {image.shape[0]}x{image.shape[1]} (HxW), the property file "
                                     f"says {size[0]}x{size[1]}")
            labels[i] = cls
        except (RecordIOError, ImageDecodeError, ValueError) as err:
            broken.append({"key": key, "offset": offset, "error": str(err)})
            if max_errors is not None and len(broken) >= max_errors:
                complete = False
                break
            continue
        why = ds.range_disagreement(key, cls)
        if why is not None:
            disagreements.append({"key": key, "offset": offset, "warning": why})
    if bar is not None:
        bar.close()

    valid = labels[labels >= 0]
    if valid.size:
        report["label_range"] = [int(valid.min()), int(valid.max())]
    counted = int(valid.max()) + 1 if valid.size and complete else None
    num_classes, errors, notes = class_count_verdict(rec_path, ds.class_claims, counted, ds.identity_records)
    report.update(num_classes=num_classes, class_count_errors=errors, warnings=notes)
    if ds.identity_records is not None:
        report["identity_records"] = {"records": ds.identity_records,
                                      "split_labels": _split_labels(ds, labels)}
    # the labels say how many images an identity has (the ranges may disagree: see warnings)
    counts = np.bincount(valid, minlength=num_classes or 0)
    report["images_per_identity"] = {
        "min": int(counts.min()) if counts.size else 0,
        "median": float(np.median(counts)) if counts.size else 0.0,
        "mean": float(counts.mean()) if counts.size else 0.0,
        "max": int(counts.max()) if counts.size else 0,
        "identities_without_images": int((counts == 0).sum()),
        "histogram": images_per_identity_histogram(counts),
    }
    report["verified"] = bool(verify)
    report["broken"] = broken
    report["range_disagreements"] = disagreements
    return report


_SHOWN = 50  # entries of a list a report shows


def _split_labels(ds: FaceRecordDataset, labels: np.ndarray) -> List[Dict]:
    """``[{label, records}]``: labels whose images start more than one identity record (the
    first images of their ranges have that label), the first ``_SHOWN``."""
    starts = labels[ds.identity_ranges[:, 0] - 1]  # image keys 1..N are indices 0..N-1
    by_label: Dict[int, List[int]] = {}
    for record, label in enumerate(starts.tolist()):
        if label >= 0:
            by_label.setdefault(label, []).append(record)
    split = [{"label": label, "records": records} for label, records in by_label.items() if len(records) > 1]
    return split[:_SHOWN]


def exit_status(report: Dict) -> int:
    """``pfc-inspect``'s exit status: 0 clean, 1 broken records or a class count training refuses,
    2 fatal (the set does not open), 3 warnings only (labels that disagree with the identity
    ranges, surplus identity records; training uses the labels)."""
    if report.get("fatal"):
        return 2
    if report.get("broken") or report.get("class_count_errors"):
        return 1
    return 3 if report.get("range_disagreements") or report.get("warnings") else 0


def format_report(report: Dict) -> str:
    """Human-readable text for an ``inspect_dataset`` report."""
    lines = [f"file        {report['rec']}"]
    if report.get("fatal"):
        lines.append(f"FATAL       {report['fatal']}")
        return "\n".join(lines)
    lines.append(f"index       {report['idx'] or '(none: built by scanning)'}")
    lines.append(f"layout      {report['layout']}")
    if "header" in report:
        lines.append(f"header      flag {report['header']['flag']}, label {report['header']['label']}")
    if report.get("property"):
        lines.append(f"property    {','.join(str(x) for x in report['property'])}")
    lines.append(f"records     {report['num_records']} ({report['file_bytes']} bytes)")
    lines.append(f"images      {report['num_images']}")
    lines.append(f"classes     {report['num_classes']} (max label + 1)")
    if report.get("identity_records"):
        records = report["identity_records"]
        split = "".join(f"; label {e['label']} starts records {', '.join(map(str, e['records']))}"
                        for e in records["split_labels"][:5])
        lines.append(f"id records  {records['records']}{split}")
    if "label_range" in report:
        lines.append(f"labels      {report['label_range'][0]} .. {report['label_range'][1]}")
    ipi = report["images_per_identity"]
    lines.append(
        f"per id      min {ipi['min']}  median {ipi['median']:g}  mean {ipi['mean']:.2f}  max {ipi['max']}"
    )
    hist = ipi["histogram"]
    width = max((h["identities"] for h in hist), default=0)
    for h in hist:
        bar = "#" * (0 if width == 0 else max(1 if h["identities"] else 0, round(40 * h["identities"] / width)))
        span = f"{h['lo']}" if h["lo"] == h["hi"] else f"{h['lo']}-{h['hi']}"
        lines.append(f"  {span:>11} images: {h['identities']:>9} ids {bar}")
    broken = report.get("broken", [])
    what = "verified (read + decode)" if report.get("verified") else "labels read"
    lines.append(f"{what}: {len(broken)} broken record(s)")
    for b in broken[:_SHOWN]:
        lines.append(f"  key {b['key']} offset {b['offset']}: {b['error']}")
    if len(broken) > _SHOWN:
        lines.append(f"  ... and {len(broken) - _SHOWN} more")
    for error in report.get("class_count_errors", []):
        lines.append(f"error: {error}")
    for note in report.get("warnings", []):
        lines.append(f"warning: {note}")
    warnings = report.get("range_disagreements", [])
    if warnings:
        lines.append(f"warning: {len(warnings)} label(s) disagree with the header's identity ranges "
                     "(training uses the labels; data.label_check decides what it says)")
        for w in warnings[:_SHOWN]:
            lines.append(f"  key {w['key']} offset {w['offset']}: {w['warning']}")
        if len(warnings) > _SHOWN:
            lines.append(f"  ... and {len(warnings) - _SHOWN} more")
    return "\n".join(lines)
