"""A new user's own photos: .pgm folders, stray files, unreadable and odd-sized images, resize
modes, and one HxW convention in every flag and message."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from partial_fc.data import FaceRecordDataset, ImageFolderDataset, IRHeader, LabelError, RecordIOWriter, pack
from partial_fc.data.packing import PackError, fit_image, pack_dataset
from partial_fc.tools import inspect as inspect_tool
from partial_fc.tools import pack as pack_tool

from tests.helpers.data_files import jpeg_bytes


def _orl_like(root, ids=2, per_id=3, size_hw=(112, 92)):
    """AT&T/ORL-style folders: s1/1.pgm ... (grayscale, 112 high, 92 wide) plus stray files."""
    rng = np.random.default_rng(0)
    for i in range(1, ids + 1):
        folder = root / f"s{i}"
        folder.mkdir(parents=True)
        for k in range(1, per_id + 1):
            Image.fromarray(rng.integers(0, 256, size=size_hw, dtype=np.uint8), "L").save(folder / f"{k}.pgm")
        (folder / "Thumbs.db").write_bytes(b"\0" * 16)
    (root / "s1" / "notes.txt").write_text("taken 1994")
    return root


def test_pgm_folders_pack_and_stray_files_are_counted(tmp_path, capsys):
    src = _orl_like(tmp_path / "orl")
    assert pack_tool.main([str(src), str(tmp_path / "ds"), "--workers", "1", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 6 and summary["num_classes"] == 2 and summary["image_size"] == [112, 92]
    assert sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in summary["ignored_files"]) == [
        "s1/Thumbs.db", "s1/notes.txt", "s2/Thumbs.db"]
    ds = ImageFolderDataset(src)
    assert len(ds) == 6 and len(ds.ignored_files) == 3 and ds[0][0].shape == (112, 92, 3)
    lst = tmp_path / "list.txt"
    lst.write_text(f"{src}/s1/1.pgm\t0\n{src}/s1/notes.txt\t0\n")
    with pytest.raises(PackError, match=rf"{lst}:2: '.*notes\.txt' has no image extension \(accepted: .*\.pgm"):
        pack_dataset(lst, tmp_path / "o", progress=False)


def test_an_unreadable_image_is_named_without_python_object_reprs(tmp_path, capsys):
    src = _orl_like(tmp_path / "orl")
    bad = src / "s2" / "broken.jpg"
    bad.write_bytes(b"this is not a picture")
    assert pack_tool.main([str(src), str(tmp_path / "ds"), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a readable image (21 bytes" in err and "--skip-bad" in err
    assert "BytesIO" not in err and "skip_bad " not in err


def test_mixed_sizes_are_refused_when_packing_and_resize_is_hxw_with_modes(tmp_path):
    src = _orl_like(tmp_path / "orl")
    odd = src / "s2" / "9.pgm"
    Image.new("L", (112, 112)).save(odd)
    with pytest.raises(PackError, match=rf"{odd}: image is 112x112 \(HxW\) but the first image \(.*1\.pgm\) "
                                         r"is 112x92.*--resize HxW"):
        pack_dataset(src, tmp_path / "a", progress=False)
    odd.unlink()
    summary = pack_dataset(src, tmp_path / "b", resize="112x112", resize_mode="crop", progress=False)
    assert summary["image_size"] == [112, 112]
    assert FaceRecordDataset(tmp_path / "b")[0][0].shape == (112, 112, 3)
    with pytest.raises(PackError, match="resize: expected S or HxW"):
        pack_dataset(src, tmp_path / "c", resize="big", progress=False)


def test_fit_image_modes_against_numpy_references():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(40, 20, 3), dtype=np.uint8)  # 40 high, 20 wide
    image = Image.fromarray(pixels)
    crop = np.asarray(fit_image(image, (10, 10), "crop"))
    expected = np.asarray(Image.fromarray(pixels[10:30]).resize((10, 10), Image.BILINEAR))
    np.testing.assert_array_equal(crop, expected)  # centre 20x20, then resized
    pad = np.asarray(fit_image(image, (20, 20), "pad"))
    inner = np.asarray(image.resize((10, 20), Image.BILINEAR))
    np.testing.assert_array_equal(pad[:, 5:15], inner)
    assert not pad[:, :5].any() and not pad[:, 15:].any()
    assert fit_image(image, (20, 30), "stretch").size == (30, 20)
    with pytest.raises(ValueError, match="resize mode must be one of"):
        fit_image(image, (4, 4), "zoom")


def _rec_with_sizes(root, sizes_hw, property_hw):
    root.mkdir(parents=True)
    n = len(sizes_hw)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(2, [n + 1, n + 2], 0, 0), b""))
        for key, hw in enumerate(sizes_hw, start=1):
            w.write(key, pack(IRHeader(0, 0.0, key, 0), jpeg_bytes(np.zeros((*hw, 3), np.uint8))))
        w.write(n + 1, pack(IRHeader(2, [1, n + 1], 0, 0), b""))
    (root / "property").write_text(f"1,{property_hw[0]},{property_hw[1]}")
    return root


def test_sizes_are_checked_by_inspect_and_when_opened_for_training(tmp_path, capsys):
    root = _rec_with_sizes(tmp_path / "mixed", [(16, 16), (16, 12), (16, 16)], (16, 16))
    assert inspect_tool.main([str(root), "--verify", "--json", "--no-progress"]) == 1
    broken = json.loads(capsys.readouterr().out)["broken"]
    assert [(b["key"], b["error"]) for b in broken] == [(2, "image is 16x12 (HxW), the property file says 16x16")]
    small = _rec_with_sizes(tmp_path / "small", [(112, 92)], (112, 92))
    with pytest.raises(ValueError, match=r"small/property: images are 112x92 \(HxW\) but 112x112 are needed; "
                                         r"repack with pfc-pack --resize 112x112"):
        FaceRecordDataset(small, image_size=(112, 112))


def test_a_recordio_folder_given_as_a_folder_set_says_what_to_pass(tmp_path):
    root = _rec_with_sizes(tmp_path / "mine", [(8, 8)], (8, 8))
    with pytest.raises(LabelError, match=rf"{root}: no identity folders .*data=rec data.root={root}"):
        ImageFolderDataset(root)


def test_images_outside_the_identity_folder_layout_are_reported_not_dropped_silently(tmp_path, caplog):
    src = _orl_like(tmp_path / "orl")
    nested = src / "s1" / "more"  # one level too deep: not read
    nested.mkdir()
    for k in range(2):
        Image.new("L", (92, 112)).save(nested / f"{k}.pgm")
    Image.new("L", (92, 112)).save(src / "loose.pgm")  # beside the identity folders
    with caplog.at_level("WARNING"):
        ds = ImageFolderDataset(src)
    assert len(ds) == 6 and ds.num_classes == 2
    assert {p.relative_to(src).as_posix() for p in ds.ignored_files} == {
        "loose.pgm", "s1/more", "s1/Thumbs.db", "s1/notes.txt", "s2/Thumbs.db"}
    assert any("5 file(s) or folder(s) outside the layout <identity>/<image> ignored" in m
               and "2 image(s) lie in ignored folders" in m for m in caplog.messages)


def test_extraction_takes_the_image_extensions_of_the_data_sets(tmp_path, caplog):
    from partial_fc.data.datasets import IMAGE_EXTENSIONS
    from partial_fc.eval.extraction import ImageFolderFaces

    for k, ext in enumerate(IMAGE_EXTENSIONS):
        Image.new("RGB", (112, 112), (k, k, k)).save(tmp_path / f"face{k}{ext}")
    (tmp_path / "notes.txt").write_text("not a face")
    with caplog.at_level("WARNING"):
        faces = ImageFolderFaces(tmp_path)
    assert sorted(faces.keys) == sorted(f"face{k}{ext}" for k, ext in enumerate(IMAGE_EXTENSIONS))
    assert any("1 file(s) without an image extension not embedded" in m for m in caplog.messages)
