"""pfc-make-bin: verification .bin sets from an image folder and a pairs list (LFW or plain)."""
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partial_fc.eval import load_bin
from partial_fc.eval.bin_format import read_bin_records
from partial_fc.eval.pairs import PairsError, make_bin, read_pairs
from partial_fc.tools import make_bin as make_bin_tool

REAL_FACES = Path(__file__).resolve().parents[2].parent / "shared" / "real_faces"


def _photo(seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _save(path: Path, array: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def _expected(array: np.ndarray, crop, size=(112, 112)) -> np.ndarray:
    """Centre crop (HxW) then bilinear resize, done here independently of the module."""
    h, w = array.shape[:2]
    top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
    cropped = array[top:top + crop[0], left:left + crop[1]]
    return np.asarray(Image.fromarray(cropped).resize(size, Image.BILINEAR), dtype=np.float64)


@pytest.fixture
def lfw_layout(tmp_path):
    """Three people with three 140x160 photos each and a 2-fold LFW pairs.txt (1 pair per kind)."""
    root = tmp_path / "lfw"
    photos = {}
    for p, name in enumerate(["Ann_A", "Bob_B", "Cid_C"]):
        for n in range(1, 4):
            photos[(name, n)] = _photo(10 * p + n, 140, 160)
            _save(root / name / f"{name}_{n:04d}.jpg", photos[(name, n)], "PNG")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t1\nAnn_A\t1\t2\nBob_B\t3\tCid_C\t1\nCid_C\t2\t3\nAnn_A\t3\tBob_B\t2\n")
    expected_pairs = [(("Ann_A", 1), ("Ann_A", 2), True), (("Bob_B", 3), ("Cid_C", 1), False),
                      (("Cid_C", 2), ("Cid_C", 3), True), (("Ann_A", 3), ("Bob_B", 2), False)]
    return root, pairs, photos, expected_pairs


def test_lfw_pairs_round_trip_with_crop_and_resize(lfw_layout, tmp_path):
    root, pairs, photos, expected_pairs = lfw_layout
    out = tmp_path / "set.bin"
    summary = make_bin(root, pairs, out, crop=(130, 120), workers=2, progress=False)
    assert summary["num_pairs"] == 4 and summary["num_same"] == 2
    images, issame = load_bin(out, progress=False)
    assert images.shape == (8, 112, 112, 3) and images.dtype == np.uint8
    assert issame.tolist() == [same for _, _, same in expected_pairs]
    for i, (a, b, _) in enumerate(expected_pairs):
        for j, key in enumerate((a, b)):
            error = np.abs(images[2 * i + j].astype(np.float64) - _expected(photos[key], (130, 120)))
            assert error.mean() < 2.0, (i, j, error.mean())  # JPEG q95 of a smooth image
    # insightface's own reader: pickle.load(f, encoding="bytes") -> (list of bytes, list of bool)
    with open(out, "rb") as f:
        bins, flags = pickle.load(f, encoding="bytes")
    assert len(bins) == 8 and all(isinstance(b, bytes) for b in bins) and flags == issame.tolist()


def test_images_already_at_size_keep_their_bytes(tmp_path):
    root = tmp_path / "faces"
    blobs = []
    for k in range(4):
        buf = io.BytesIO()
        Image.fromarray(_photo(k, 112, 112)).save(buf, format="JPEG", quality=90)
        (root).mkdir(exist_ok=True)
        (root / f"f{k}.jpg").write_bytes(buf.getvalue())
        blobs.append(buf.getvalue())
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# comment\nf0.jpg f1.jpg 1\n\nf2.jpg\tf3.jpg\t0\n")
    make_bin(root, pairs, tmp_path / "o.bin", progress=False)
    images, issame = read_bin_records(tmp_path / "o.bin")
    assert images == blobs and issame == [True, False]


def test_plain_list_with_spaces_in_tab_separated_paths_and_absolute_paths(tmp_path):
    root = tmp_path / "root"
    a = _save(root / "person one" / "a b.png", _photo(1, 100, 120))
    b = _save(tmp_path / "elsewhere" / "c.png", _photo(2, 100, 120))
    pairs = tmp_path / "list.txt"
    pairs.write_text(f"person one/a b.png\t{b}\t0\n")
    [pair] = read_pairs(pairs, root)
    assert (pair.first, pair.second, pair.issame, pair.line) == (a, b, False, 1)
    make_bin(root, pairs, tmp_path / "o.bin", size=(112, 96), progress=False)  # HxW
    images, issame = load_bin(tmp_path / "o.bin", progress=False)
    assert images.shape == (2, 112, 96, 3) and issame.tolist() == [False]


def test_missing_images_are_named_with_their_line_and_nothing_is_written(lfw_layout, tmp_path):
    root, pairs, _, _ = lfw_layout
    (root / "Cid_C" / "Cid_C_0003.jpg").unlink()
    out = tmp_path / "set.bin"
    with pytest.raises(PairsError) as err:
        make_bin(root, pairs, out, progress=False)
    message = str(err.value)
    assert "1 image(s)" in message and f"{pairs}:4:" in message and "Cid_C_0003.jpg" in message
    assert not out.exists()


@pytest.mark.parametrize("text, where, what", [
    ("2\t1\nAnn_A\t1\t2\nBob_B\t3\tCid_C\t1\n", ":", "2 fold(s) of 1 matched"),
    ("1\t1\nAnn_A\t1\nBob_B\t3\tCid_C\t1\n", ":2:", "found 2 fields"),
    ("1\t1\nAnn_A\t1\t0\nBob_B\t3\tCid_C\t1\n", ":2:", "image number '0'"),
    ("a.jpg b.jpg 1\nc.jpg d.jpg maybe\n", ":2:", "label 'maybe'"),
    ("a.jpg b.jpg c.jpg 1\n", ":1:", "expected 'path1 path2 0|1'"),
    ("# nothing\n\n", "", "no pairs"),
])
def test_malformed_pairs_lists_name_file_and_line(tmp_path, text, where, what):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(text)
    with pytest.raises(PairsError) as err:
        read_pairs(pairs, tmp_path)
    assert f"{pairs}{where}" in str(err.value) and what in str(err.value)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "pairs.txt").write_text("a.jpg b.jpg 1\n")
    code = make_bin_tool.main([str(tmp_path), str(tmp_path / "pairs.txt"), "-o", str(tmp_path / "o.bin"),
                               "--no-progress", "--workers", "1"])
    assert code == 2
    assert "pfc-make-bin: error:" in capsys.readouterr().err


def test_real_lfw_photos_and_lfw_pairs_layout(tmp_path, capsys):
    """Real LFW photos (250x250, grey JPEG) and LFW's own pairs.txt layout, through the CLI."""
    if not (REAL_FACES / "lfw_subset_pairs.txt").is_file():
        pytest.skip(f"real LFW photos not found at {REAL_FACES}")
    out = tmp_path / "lfw_subset.bin"
    code = make_bin_tool.main([str(REAL_FACES / "lfw_subset"), str(REAL_FACES / "lfw_subset_pairs.txt"),
                               "-o", str(out), "--crop", "150", "--workers", "2", "--no-progress"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["num_pairs"] == 300
    images, issame = load_bin(out, progress=False)
    assert images.shape == (600, 112, 112, 3)
    assert issame.tolist() == [True] * 150 + [False] * 150  # one fold: matched, then mismatched
    lines = (REAL_FACES / "lfw_subset_pairs.txt").read_text().splitlines()
    for i in (0, 149, 150, 299):  # spot-check pairs against the list, pixel by pixel
        fields = lines[1 + i].split("\t")
        names = [(fields[0], fields[1]), (fields[0], fields[2])] if len(fields) == 3 else \
            [(fields[0], fields[1]), (fields[2], fields[3])]
        for j, (name, n) in enumerate(names):
            photo = np.asarray(Image.open(REAL_FACES / "lfw_subset" / name / f"{name}_{int(n):04d}.jpg")
                               .convert("RGB"))
            error = np.abs(images[2 * i + j].astype(np.float64) - _expected(photo, (150, 150)))
            assert error.mean() < 3.0, (i, j, error.mean())


def test_sizes_are_height_by_width_as_everywhere_else():
    """`--size`/`--crop` take HxW like pfc-pack's `--resize`: a 120x100 (HxW) photo cropped to
    100x60 and sized to 50x30 decodes as 50 rows of 30 pixels."""
    import io

    import numpy as np
    from PIL import Image

    from partial_fc.data.image import decode_image
    from partial_fc.data.packing import parse_size
    from partial_fc.eval.pairs import prepare_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 100, 3), dtype=np.uint8)).save(buf, "PNG")
    out = prepare_image(buf.getvalue(), size=parse_size("50x30"), crop=parse_size("100x60"))
    assert decode_image(out).shape == (50, 30, 3)
    with pytest.raises(ValueError, match=r"crop 130x60 \(HxW\) is larger than the 120x100 image"):
        prepare_image(buf.getvalue(), size=(50, 30), crop=(130, 60))
