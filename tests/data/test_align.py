"""pfc-align: raw photos to 112x112 ArcFace crops, from landmark files and from the detector."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from partial_fc.data.aligning import AlignError, align_folder, read_landmark_file
from partial_fc.data.face_detection import DetectorUnavailable
from partial_fc.eval.alignment import ARCFACE_TEMPLATE, warp_affine
from partial_fc.tools import align as align_tool

REAL_FACES = Path(__file__).resolve().parents[2].parent / "shared" / "real_faces"
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _similarity(angle_deg: float, scale: float, shift) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, np.asarray(shift, dtype=np.float64)[:, None]])


def _marked_photo(path: Path, matrix: np.ndarray, size=(220, 200)) -> np.ndarray:
    """A photo with a coloured disc at each template landmark moved by `matrix`; returns the
    (5, 2) landmark positions (pixel centres) in the photo."""
    points = ARCFACE_TEMPLATE @ matrix[:, :2].T + matrix[:, 2]
    image = Image.new("RGB", size, (40, 40, 40))
    draw = ImageDraw.Draw(image)
    radius = 4.0 * abs(np.linalg.det(matrix[:, :2])) ** 0.5
    for (x, y), colour in zip(points, COLOURS):
        # PIL's ellipse box is in pixel-edge coordinates: pixel i spans [i, i + 1).
        draw.ellipse([x + 0.5 - radius, y + 0.5 - radius, x + 0.5 + radius, y + 0.5 + radius], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return points


def _disc_centres(crop: np.ndarray) -> np.ndarray:
    """Centroid (pixel centres) of each coloured disc in an aligned crop, weighted by colour match."""
    centres = []
    ys, xs = np.mgrid[0:crop.shape[0], 0:crop.shape[1]]
    for colour in COLOURS:
        distance = np.abs(crop.astype(np.float64) - np.array(colour)).sum(axis=2)
        weight = np.clip(1.0 - distance / 120.0, 0.0, None)
        centres.append([(weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()])
    return np.array(centres)


def _write_landmarks(path: Path, rows) -> Path:
    path.write_text("".join(f"{name} " + " ".join(f"{v:.4f}" for v in np.ravel(p)) + "\n" for name, p in rows))
    return path


def test_landmark_file_puts_known_points_on_the_template(tmp_path):
    src, rows = tmp_path / "src", []
    for k, (angle, scale, shift) in enumerate([(0, 1.5, (20, 15)), (-17, 1.2, (60, 20)), (25, 1.8, (10, -10))]):
        name = f"person_{k % 2}/photo {k}.png"  # a space in the name: the last ten fields are numbers
        rows.append((name, _marked_photo(src / name, _similarity(angle, scale, shift))))
    landmarks = _write_landmarks(tmp_path / "points.txt", rows)
    report = align_folder(src, tmp_path / "out", landmark_file=landmarks, workers=2, progress=False)
    assert report["aligned"] == 3 and report["no_face"] == report["unreadable"] == []
    for name, _ in rows:
        crop = np.asarray(Image.open(tmp_path / "out" / Path(name).with_suffix(".jpg")))
        assert crop.shape == (112, 112, 3)
        np.testing.assert_allclose(_disc_centres(crop), ARCFACE_TEMPLATE, atol=0.6)


def test_landmark_path_needs_no_detector_and_the_detector_path_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if the [align] extra were not installed
    src = tmp_path / "src"
    points = _marked_photo(src / "a" / "x.png", _similarity(5, 1.4, (30, 20)))
    landmarks = _write_landmarks(tmp_path / "points.txt", [("a/x.png", points), ("a/gone.png", points)])
    report = align_folder(src, tmp_path / "out", landmark_file=landmarks, progress=False)
    assert report["aligned"] == 1 and len(report["unreadable"]) == 1
    assert report["unreadable"][0].endswith("gone.png")
    with pytest.raises(DetectorUnavailable, match=r'pip install -e "\.\[align\]"'):
        align_folder(src, tmp_path / "out2", progress=False)
    assert align_tool.main([str(src), str(tmp_path / "out3"), "--no-progress"]) == 2


def test_landmark_paths_must_stay_inside_the_source_folder(tmp_path):
    (tmp_path / "src").mkdir()
    landmarks = _write_landmarks(tmp_path / "points.txt", [("../x.png", ARCFACE_TEMPLATE)])
    with pytest.raises(AlignError, match="must be a path inside"):
        align_folder(tmp_path / "src", tmp_path / "out", landmark_file=landmarks, progress=False)


@pytest.mark.parametrize("text, line, what", [
    ("a.png 1 2 3 4 5 6 7 8 9\n", 1, "11 fields"),
    ("# c\na.png 1 2 3 4 5 6 7 8 9 x\n", 2, "must be numbers"),
    ("a.png 1 2 3 4 5 6 7 8 9 10\na.png 1 2 3 4 5 6 7 8 9 10\n", 2, "listed again (first on line 1)"),
    ("a.png 1 2 3 4 5 6 7 8 9 nan\n", 1, "finite"),
])
def test_malformed_landmark_files_name_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "points.txt"
    path.write_text(text)
    with pytest.raises(AlignError) as err:
        read_landmark_file(path)
    assert f"{path}:{line}:" in str(err.value) and what in str(err.value)


def test_cli_writes_the_report_and_fails_when_nothing_aligns(tmp_path, capsys):
    src = tmp_path / "src"
    points = _marked_photo(src / "id" / "p.png", _similarity(0, 1.5, (20, 20)))
    landmarks = _write_landmarks(tmp_path / "points.txt", [("id/p.png", points)])
    assert align_tool.main([str(src), str(tmp_path / "out"), "--landmarks", str(landmarks),
                            "--workers", "1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "out" / "align_report.json").read_text())
    assert report["aligned"] == 1 and report["entries"][0]["output"].endswith("id/p.jpg")
    missing = _write_landmarks(tmp_path / "none.txt", [("id/none.png", points)])
    assert align_tool.main([str(src), str(tmp_path / "out2"), "--landmarks", str(missing),
                            "--workers", "1", "--no-progress"]) == 1
    assert "no photo was aligned" in capsys.readouterr().err


# --- the detector (extra [align]) ---------------------------------------------------------------

def _lfw_photo(name: str, n: int) -> np.ndarray:
    return np.asarray(Image.open(REAL_FACES / "lfw_subset" / name / f"{name}_{n:04d}.jpg").convert("RGB"))


@pytest.fixture
def detector():
    pytest.importorskip("dlib", reason='the face detector is the optional extra [align]')
    if not (REAL_FACES / "lfw_subset").is_dir():
        pytest.skip(f"real LFW photos not found at {REAL_FACES}")
    from partial_fc.data.face_detection import FaceDetector

    return FaceDetector(upsample=0)  # faces here are over 80 pixels: no need to upsample


def test_detector_landmarks_follow_a_known_similarity(detector):
    """Known landmarks: a photo moved by a known rotation, scale and shift has its detected five
    points moved by the same transform (measured in 112x112 template pixels)."""
    for name, angle, scale in [("Colin_Powell", 12, 1.3), ("Halle_Berry", -15, 0.9), ("Bill_Clinton", 8, 1.6)]:
        photo = _lfw_photo(name, 1)
        matrix = _similarity(angle, scale, (0, 0))
        corners = np.array([[0, 0], [249, 0], [0, 249], [249, 249]]) @ matrix[:, :2].T
        matrix[:, 2] = 20 - corners.min(axis=0)
        size = tuple(int(v) for v in np.ceil(corners.max(axis=0) - corners.min(axis=0) + 40))
        moved = warp_affine(photo, matrix, size)
        [face], [moved_face] = detector.detect(photo), detector.detect(moved)
        expected = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
        to_template = 112.0 / (scale * (face.box[2] - face.box[0]))  # about one template pixel
        error = np.linalg.norm(moved_face.landmarks - expected, axis=1) * to_template
        assert error.max() < 3.0, (name, error)


def test_real_lfw_photos_each_yield_one_face_with_eyes_on_the_template(detector, tmp_path):
    src = REAL_FACES / "lfw_subset"
    report = align_folder(src, tmp_path / "out", keep_largest=True, upsample=0, workers=2, progress=False)
    assert report["photos"] == 320 and report["aligned"] == 320
    assert report["no_face"] == [] and report["unreadable"] == [] and report["several_faces"] == []
    for entry in report["entries"]:
        assert (entry["faces"] > 1) == (entry["photo"] in report["several_faces_kept"])
    # Independent check of where the eyes land: detect again on each (2x upscaled) aligned crop.
    errors = []
    for entry in report["entries"][::8]:
        crop = np.asarray(Image.open(entry["output"]))
        assert crop.shape == (112, 112, 3)
        big = np.asarray(Image.fromarray(crop).resize((224, 224), Image.BILINEAR))
        faces = detector.detect(big)
        assert faces, entry["photo"]
        eyes = (faces[0].landmarks[:2] + 0.5) / 2 - 0.5  # back to 112x112 pixel centres
        errors.append(np.linalg.norm(eyes - ARCFACE_TEMPLATE[:2], axis=1))
    # Both detections' errors add up here; measured: 1.96 px median, 6.9 px at most (of 80 eyes),
    # against an inter-ocular distance of 35 px in the template.
    errors = np.concatenate(errors)
    assert np.median(errors) < 2.5 and errors.max() < 8.0, errors


def test_report_lists_photos_with_no_face_several_faces_and_unreadable_ones(detector, tmp_path):
    src = tmp_path / "src"
    (src / "p").mkdir(parents=True)
    small, large = _lfw_photo("Colin_Powell", 2), _lfw_photo("Halle_Berry", 3)
    large = np.asarray(Image.fromarray(large).resize((325, 325), Image.BILINEAR))
    group = np.zeros((325, 600, 3), np.uint8)
    group[:250, :250], group[:, 260:585] = small, large
    Image.fromarray(group).save(src / "p" / "group.png")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(src / "p" / "wall.png")
    (src / "p" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(small).save(src / "p" / "single.png")
    report = align_folder(src, tmp_path / "out", upsample=0, progress=False)
    assert report["aligned"] == 1 and report["no_face"] == [str(src / "p" / "wall.png")]
    assert report["several_faces"] == [str(src / "p" / "group.png")]
    assert report["unreadable"] == [str(src / "p" / "broken.jpg")]
    assert sorted(p.name for p in (tmp_path / "out" / "p").iterdir()) == ["single.jpg"]
    kept = align_folder(src, tmp_path / "kept", keep_largest=True, upsample=0, progress=False)
    assert kept["aligned"] == 2 and kept["several_faces_kept"] == [str(src / "p" / "group.png")]
    [group_entry] = [e for e in kept["entries"] if e["photo"].endswith("group.png")]
    assert np.all(np.asarray(group_entry["landmarks"])[:, 0] > 260)  # the larger face, on the right


def test_photos_the_landmark_file_does_not_list_are_counted_and_reported(tmp_path, capsys):
    # facenet#794, AM-Softmax#24: one identity's 3 photos had no lines and appeared nowhere
    src, rows = tmp_path / "src", []
    for person in ("a", "b"):
        for k in range(3):
            points = _marked_photo(src / person / f"{k}.png", _similarity(3 * k, 1.3, (25, 20)))
            if person == "a":
                rows.append((f"./{person}/{k}.png", points))  # a "./" prefix names the same photo
    landmarks = _write_landmarks(tmp_path / "points.txt", rows)
    out = tmp_path / "out"
    assert align_tool.main([str(src), str(out), "--landmarks", str(landmarks), "--workers", "1",
                            "--no-progress"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["photos"], summary["aligned"]) == (6, 3)
    assert summary["no_landmarks"] == [str(src / "b" / f"{k}.png") for k in range(3)]
    assert captured.err.strip() == (f"pfc-align: left out 3 of 6 photo(s) (3 without a line in the landmark "
                                    f"file); {out / 'align_report.json'} lists them")
    report = json.loads((out / "align_report.json").read_text())
    assert sorted(e["status"] for e in report["entries"]) == ["aligned"] * 3 + ["no_landmarks"] * 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == ["a/0.jpg", "a/1.jpg", "a/2.jpg"]
