"""Five-point face detectors for pfc-align, compared on real photos (LFW originals, 250x250).

Two steps, so that detectors with clashing dependencies run in their own environments:

    python bench/align_detectors.py detect --detector dlib PHOTOS -o dlib.json
    /other/venv/bin/python bench/align_detectors.py detect --detector mediapipe PHOTOS -o mp.json
    python bench/align_detectors.py compare dlib.json mp.json ...      # prints JSON

`detect` runs a detector on every `--every`-th photo and on a copy of it moved by a known
similarity (rotation +-15 degrees, scale 0.8-1.4, fixed per photo), and records the five points
(ARCFACE_TEMPLATE order) and the time per photo. `compare` reports per detector: photos with
a face, photos with exactly one, ms per photo, the equivariance error (points found on the moved
copy against the original's points moved by the known transform: a detector's precision against
a known truth, in 112x112 template pixels), and the agreement with the first file's detector
(same units). Only numpy and Pillow are needed besides the detector.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

_ALIGNMENT = Path(__file__).resolve().parents[1] / "partial_fc" / "eval" / "alignment.py"


def _alignment():
    # Loaded by path: the package's __init__ imports torch, which the other environments lack.
    spec = importlib.util.spec_from_file_location("pfc_alignment", _ALIGNMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dlib(method: str):
    from partial_fc.data.face_detection import FaceDetector

    detector = FaceDetector(method=method)
    return lambda image: [face.landmarks for face in detector.detect(image)]


def _mediapipe():
    import mediapipe as mp

    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=4, refine_landmarks=True)

    def detect(image):
        result = mesh.process(image)
        faces = []
        for face in result.multi_face_landmarks or []:
            pts = np.array([(p.x * image.shape[1] - 0.5, p.y * image.shape[0] - 0.5) for p in face.landmark])
            eyes = sorted([pts[468], pts[473]], key=lambda p: p[0])  # iris centres
            mouth = sorted([pts[61], pts[291]], key=lambda p: p[0])  # lip corners
            faces.append(np.stack([eyes[0], eyes[1], pts[1], mouth[0], mouth[1]]))
        faces.sort(key=lambda f: -np.ptp(f[:, 0]) * np.ptp(f[:, 1]))
        return faces
    return detect


DETECTORS = {
    "dlib": lambda: _dlib("hog+cnn"),  # what pfc-align uses: HOG, CNN where HOG finds none
    "dlib-hog": lambda: _dlib("hog"),
    "dlib-cnn": lambda: _dlib("cnn"),
    "mediapipe": _mediapipe,
}


def _known_similarity(index: int, size: int):
    rng = np.random.default_rng(index)
    angle, scale = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(0.8, 1.4)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]]) @ linear.T
    shift = 10 - corners.min(axis=0)
    out = int(np.ceil((corners.max(axis=0) - corners.min(axis=0)).max() + 20))
    return np.hstack([linear, shift[:, None]]), out


def detect(args) -> None:
    alignment = _alignment()
    run = DETECTORS[args.detector]()
    photos = sorted(p for p in Path(args.photos).rglob("*") if p.suffix.lower() in (".jpg", ".png"))[::args.every]
    records, seconds = [], 0.0
    for index, path in enumerate(photos):
        image = np.asarray(Image.open(path).convert("RGB"))
        start = time.perf_counter()
        faces = run(image)
        seconds += time.perf_counter() - start
        matrix, out = _known_similarity(index, image.shape[0])
        moved = run(alignment.warp_affine(image, matrix, (out, out)))
        records.append({"photo": path.name, "faces": [f.tolist() for f in faces],
                        "moved_faces": [f.tolist() for f in moved], "matrix": matrix.tolist()})
    Path(args.output).write_text(json.dumps({"detector": args.detector, "photos": len(photos),
                                             "ms_per_photo": 1000 * seconds / max(1, len(photos)),
                                             "records": records}))


def _to_template(alignment, points) -> np.ndarray:
    return alignment.estimate_similarity(points, alignment.ARCFACE_TEMPLATE)


def compare(args) -> None:
    alignment = _alignment()
    runs = [json.loads(Path(p).read_text()) for p in args.files]
    reference = {r["photo"]: r for r in runs[0]["records"]}
    table = []
    for run in runs:
        equi, agree = [], []
        for rec in run["records"]:
            if not rec["faces"]:
                continue
            points = np.asarray(rec["faces"][0])
            to_template = _to_template(alignment, points)
            if rec["moved_faces"]:
                matrix = np.asarray(rec["matrix"])
                expected = points @ matrix[:, :2].T + matrix[:, 2]
                moved = np.asarray(rec["moved_faces"][0])
                # distances in the moved photo, brought to template pixels by the two scales
                scale = np.linalg.norm(to_template[:, 0]) / np.linalg.norm(matrix[:, 0])
                equi.append(np.linalg.norm(moved - expected, axis=1) * scale)
            ref = reference.get(rec["photo"])
            if ref is not None and ref["faces"]:
                ref_points = np.asarray(ref["faces"][0])
                ref_matrix = _to_template(alignment, ref_points)
                mapped = lambda p: p @ ref_matrix[:, :2].T + ref_matrix[:, 2]  # noqa: E731
                agree.append(np.linalg.norm(mapped(points) - mapped(ref_points), axis=1))
        equi, agree = np.array(equi), np.array(agree)
        n = run["photos"]
        table.append({
            "detector": run["detector"], "photos": n,
            "with_face": sum(bool(r["faces"]) for r in run["records"]),
            "exactly_one": sum(len(r["faces"]) == 1 for r in run["records"]),
            "ms_per_photo": round(run["ms_per_photo"], 1),
            "equivariance_px_eyes_median": round(float(np.median(equi[:, :2])), 2),
            "equivariance_px_eyes_p95": round(float(np.percentile(equi[:, :2], 95)), 2),
            "equivariance_px_all5_median": round(float(np.median(equi)), 2),
            "agreement_with_" + runs[0]["detector"] + "_px": {
                name: round(float(np.median(agree[:, cols])), 2)
                for name, cols in (("eyes", [0, 1]), ("nose", [2]), ("mouth", [3, 4]))},
        })
    print(json.dumps(table, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    d = sub.add_parser("detect")
    d.add_argument("photos")
    d.add_argument("--detector", choices=sorted(DETECTORS), required=True)
    d.add_argument("--every", type=int, default=4, help="use every n-th photo (default 4)")
    d.add_argument("-o", "--output", required=True)
    c = sub.add_parser("compare")
    c.add_argument("files", nargs="+", help="detect outputs; the first is the agreement reference")
    args = parser.parse_args()
    detect(args) if args.step == "detect" else compare(args)


if __name__ == "__main__":
    main()
