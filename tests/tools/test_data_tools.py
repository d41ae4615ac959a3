"""pfc-pack / pfc-inspect / pfc-synthetic: library functions, CLIs and ``python -m`` entry
points."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from partial_fc.data import FaceRecordDataset, LabelError, RecordIOReader, decode_image, generate_synthetic, unpack
from partial_fc.data.packing import PackError, pack_dataset
from partial_fc.tools import inspect as inspect_tool
from partial_fc.tools import pack as pack_tool
from partial_fc.tools import synthetic as synthetic_tool

from tests.helpers.data_files import make_identity_folder

REPO = Path(__file__).resolve().parents[2]


class _PairsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # a .bin holds only lists, bytes and bools
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a .bin")


def _load_bin(path):
    with open(path, "rb") as f:
        return _PairsUnpickler(f).load()


def test_pack_folder_round_trip(tmp_path):
    src = make_identity_folder(tmp_path / "faces", num_ids=4, per_id=(3, 1, 2), seed=1)
    summary = pack_dataset(src, tmp_path / "out", workers=1, progress=False)
    assert summary["num_images"] == 9 and summary["num_classes"] == 4
    assert (tmp_path / "out" / "property").read_text().strip() == "4,32,40"
    ds = FaceRecordDataset(tmp_path / "out")
    assert ds.layout == "insightface" and ds.num_classes == 4
    files = sorted((p, c) for c, d in enumerate(sorted(src.iterdir())) for p in sorted(d.iterdir()))
    files.sort(key=lambda pc: (pc[1], pc[0].name))
    assert len(ds) == len(files)
    for i, (path, label) in enumerate(files):
        image, got = ds[i]
        assert got == label
        np.testing.assert_array_equal(image, decode_image(path.read_bytes()))
        assert ds.read_record(i)[1] == path.read_bytes()
    # deterministic whatever the number of workers
    pack_dataset(src, tmp_path / "out2", workers=2, progress=False)
    assert (tmp_path / "out2" / "train.rec").read_bytes() == (tmp_path / "out" / "train.rec").read_bytes()
    assert (tmp_path / "out2" / "train.idx").read_bytes() == (tmp_path / "out" / "train.idx").read_bytes()


def test_pack_list_file_resize_and_bad_images(tmp_path):
    src = make_identity_folder(tmp_path / "faces", num_ids=2, per_id=(2,), seed=2)
    imgs = sorted(src.rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{imgs[2]}\t1\n{imgs[0]}\t0\n{broken.name}\t1\n{imgs[3]}\t1\n{imgs[1]}\t0\n")
    with pytest.raises(PackError, match="broken.jpg"):
        pack_dataset(lst, tmp_path / "o1", validate=True, progress=False)
    summary = pack_dataset(lst, tmp_path / "o2", resize="24x20", validate=True, skip_bad=True, progress=False)
    assert summary["num_images"] == 4 and len(summary["skipped"]) == 1
    ds = FaceRecordDataset(tmp_path / "o2")
    assert [ds[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert ds[0][0].shape == (24, 20, 3)  # --resize is HxW, like every size in messages and property
    assert (tmp_path / "o2" / "property").read_text().strip() == "2,24,20"
    lst.write_text(f"{imgs[0]}\t0\n{imgs[1]}\t2\n")
    with pytest.raises(LabelError, match="identity 1 has no images"):
        pack_dataset(lst, tmp_path / "o3", progress=False)


def test_pack_and_inspect_clis(tmp_path, capsys):
    src = make_identity_folder(tmp_path / "faces", num_ids=3, per_id=(2, 2, 1), seed=3)
    assert pack_tool.main([str(src), str(tmp_path / "ds"), "--workers", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 5
    assert inspect_tool.main([str(tmp_path / "ds"), "--verify", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 3 and report["label_range"] == [0, 2] and report["broken"] == []
    assert report["images_per_identity"]["min"] == 1 and report["images_per_identity"]["max"] == 2
    # break the image of key 2 without touching the framing: overwrite its JPEG start marker
    reader = RecordIOReader(tmp_path / "ds" / "train.rec")
    head, payload = unpack(reader.read(2))
    at = reader.offset_of(2) + 8 + 24
    raw = bytearray((tmp_path / "ds" / "train.rec").read_bytes())
    assert raw[at : at + 2] == b"\xff\xd8"
    raw[at : at + 4] = b"XXXX"
    (tmp_path / "ds" / "train.rec").write_bytes(bytes(raw))
    assert inspect_tool.main([str(tmp_path / "ds"), "--no-progress"]) == 0  # labels still fine
    capsys.readouterr()
    assert inspect_tool.main([str(tmp_path / "ds"), "--verify", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 broken record(s)" in out and f"key 2 offset {reader.offset_of(2)}" in out


def test_synthetic_set(tmp_path, synthetic_small):
    summary = json.loads((synthetic_small / "synthetic.json").read_text())
    assert summary["num_classes"] == 10 and summary["num_images"] == 40 and summary["num_pairs"] == 20
    ds = FaceRecordDataset(synthetic_small)
    assert ds.num_classes == 10 and [ds[i][1] for i in range(0, 40, 4)] == list(range(10))
    assert ds[0][0].shape == (112, 112, 3)
    images, issame = _load_bin(synthetic_small / "heldout.bin")
    assert len(images) == 40 and len(issame) == 20 and sum(issame) == 10
    assert all(isinstance(b, bytes) for b in images) and all(isinstance(s, bool) for s in issame)
    assert decode_image(images[0]).shape == (112, 112, 3)
    assert summary["negative_pairs_same_family"] >= 6  # mostly within families (80% expected)
    # deterministic, whatever the number of workers
    again = generate_synthetic(tmp_path / "again", num_identities=10, images_per_identity=4, family_size=2,
                               num_heldout_identities=4, num_pairs=20, seed=3, workers=2, progress=False)
    for name in ("train.rec", "train.idx", "property", "heldout.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (synthetic_small / name).read_bytes(), name
    assert again["num_images"] == 40


def test_synthetic_identities_and_families_are_ordered_by_likeness(synthetic_small):
    ds = FaceRecordDataset(synthetic_small)
    assert len({ds.read_record(i)[1] for i in range(len(ds))}) == 40  # no two images alike
    faces = np.stack([ds[i][0][36:96, 26:86] for i in range(len(ds))]).astype(np.float32).reshape(40, -1)
    labels = np.array([ds[i][1] for i in range(len(ds))])
    dist = ((faces[:, None] - faces[None]) ** 2).mean(-1)
    same_id = (labels[:, None] == labels[None]) & ~np.eye(40, dtype=bool)
    same_family = (labels[:, None] // 2 == labels[None] // 2) & (labels[:, None] != labels[None])
    other = labels[:, None] // 2 != labels[None] // 2
    # pictures of one identity vary (jitter) but stay closer than family look-alikes, which stay
    # closer than unrelated identities
    assert 0 < dist[same_id].mean() < dist[same_family].mean() < dist[other].mean()


def test_synthetic_cli_and_module_entry(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synthetic_tool.main([str(out), "--identities", "3", "--images-per-identity", "2", "--heldout-identities",
                                "2", "--pairs", "4", "--family-size", "1", "--workers", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 6
    proc = subprocess.run([sys.executable, "-m", "partial_fc.tools.inspect", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "classes     3" in proc.stdout
