"""The class count of a RecordIO set is its labels' (max label + 1): a request or property that
agrees is taken without reading every label, one that disagrees is refused naming both, identity
records that outnumber the classes (Glint360K) are a warning, and the labels are read once and
only when something disagrees (DALI-shuffled sets of millions of records)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from partial_fc.data import FaceRecordDataset, IRHeader, LabelError, RecordIOReader, RecordIOWriter, pack, unpack
from partial_fc.data.datasets import class_count_verdict
from partial_fc.data.recordio import first_label
from partial_fc.tools import inspect as inspect_tool

from tests.helpers.data_files import jpeg_bytes

# insightface#1507 in miniature: label 2 is split over identity records 2 and 3 (5 records, 4 classes)
LABELS = [0, 0, 1, 1, 2, 2, 2, 3, 3]
RANGES = [(1, 3), (3, 5), (5, 6), (6, 8), (8, 10)]


def _write_insightface(root, labels=LABELS, ranges=RANGES, prop=None, extra_keys=()):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = len(labels)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(2, [n + 1, n + 1 + len(ranges)], 0, 0), b""))
        for key, label in enumerate(labels, start=1):
            w.write(key, pack(IRHeader(0, float(label), key, 0),
                              jpeg_bytes(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8))))
        for j, (a, b) in enumerate(ranges):
            w.write(n + 1 + j, pack(IRHeader(2, [a, b], 0, 0), b""))
        for key in extra_keys:
            w.write(key, pack(IRHeader(0, 0.0, key, 0), b"appended"))
    if prop is not None:
        (root / "property").write_text(f"{prop},8,8")
    return root


def _write_shuffled_im2rec(root, num_records=40, num_classes=8, seed=1):
    """An im2rec set as a DALI shuffle writes it: no header record, keys in shuffled order."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    keys = rng.permutation(num_records)
    labels = {int(k): int(k) % num_classes for k in keys}
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key in keys.tolist():
            w.write(key, pack(IRHeader(0, float(labels[key]), key, 0),
                              jpeg_bytes(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8))))
    return root, labels


@pytest.fixture
def reads(monkeypatch):
    """Every record the readers read, in order, as ("read"|"head", key): the real reader, counted."""
    seen = []
    read, read_head = RecordIOReader.read, RecordIOReader.read_head

    def counted_read(self, key):
        seen.append(("read", key))
        return read(self, key)

    def counted_head(self, key, size):
        seen.append(("head", key))
        return read_head(self, key, size)

    monkeypatch.setattr(RecordIOReader, "read", counted_read)
    monkeypatch.setattr(RecordIOReader, "read_head", counted_head)
    return seen


def test_split_identity_counts_classes_from_the_labels_and_warns_of_the_surplus_record(tmp_path, caplog):
    root = _write_insightface(tmp_path / "glint")
    with caplog.at_level(logging.WARNING):
        ds = FaceRecordDataset(root)
    assert ds.num_classes == 4 and ds.identity_records == 5
    assert [m for m in caplog.messages if "surplus" in m] == [
        f"{root / 'train.rec'}: the header holds 5 identity records for 4 classes (max label 3 + 1): "
        "1 surplus identity record(s), e.g. an identity split over several records (as in Glint360K); "
        "the image labels are used"]
    # the range check compares an image with the first image of its range: a split is no disagreement
    assert [ds.label_of(i) for i in range(len(ds))] == LABELS and ds.label_disagreements == 0


def test_a_request_or_property_that_agrees_with_the_labels_is_accepted_and_one_that_does_not_is_refused(
        tmp_path, caplog):
    root = _write_insightface(tmp_path / "glint")
    assert FaceRecordDataset(root, num_classes=4).num_classes == 4
    with pytest.raises(LabelError, match=r"^data\.num_classes=5 but the dataset has 4 classes \(the labels of "
                                         rf"{root / 'train.rec'}: max label 3 \+ 1\)$"):
        FaceRecordDataset(root, num_classes=5, num_classes_key="data.num_classes")
    with pytest.raises(LabelError, match=r"num_classes=3 but the dataset has 4"):
        FaceRecordDataset(root, num_classes=3)
    (root / "property").write_text("4,8,8")
    assert FaceRecordDataset(root).num_classes == 4
    (root / "property").write_text("5,8,8")  # the identity records' count, not the classes'
    with pytest.raises(LabelError, match=rf"^{root / 'property'}: says 5 classes but the labels of .* say 4 "
                                         r"\(max label 3 \+ 1\); correct it, or remove it to count the labels$"):
        FaceRecordDataset(root)
    with caplog.at_level(logging.WARNING):  # the request agrees with the labels: the property is only wrong
        assert FaceRecordDataset(root, num_classes=4, num_classes_key="data.num_classes").num_classes == 4
    assert any(f"{root / 'property'}: says 5 classes but the labels" in m and "(as does data.num_classes=4)" in m
               for m in caplog.messages)


def test_a_given_class_count_opens_a_shuffled_im2rec_set_from_its_idx_without_reading_labels(tmp_path, reads):
    root, labels = _write_shuffled_im2rec(tmp_path / "dali")
    ds = FaceRecordDataset(root, num_classes=8)
    assert ds.layout == "im2rec" and ds.num_classes == 8 and len(ds) == 40
    assert reads == [("read", 0)]  # key 0 only, to tell the layout: 1 record of 40
    reads.clear()
    ds = FaceRecordDataset(root)  # nothing says how many classes: every label, once, headers only
    assert ds.num_classes == 8
    assert reads[0] == ("read", 0) and sorted(reads[1:]) == sorted(("head", k) for k in labels)
    assert [ds.label_of(i) for i in range(len(ds))] == [labels[k] for k in sorted(labels)]


def test_insightface_set_with_a_class_count_reads_the_first_image_of_each_range_not_every_image(tmp_path, reads):
    root = _write_insightface(tmp_path / "glint", prop=4)
    FaceRecordDataset(root, num_classes=4)
    heads = [key for kind, key in reads if kind == "head"]
    assert heads == [a for a, _ in RANGES]  # 5 of 9 images here; C of N in general
    assert [key for kind, key in reads if kind == "read"] == [0, 10, 11, 12, 13, 14]  # header, id records


def test_read_head_is_the_start_of_read_for_every_mxnet_record(recordio_fixtures):
    for name in ("insightface", "im2rec"):
        reader = RecordIOReader(recordio_fixtures / name / "train.rec")
        for key in reader.keys:
            data = reader.read(key)
            for size in (1, 28, 100, 10 ** 6):
                assert reader.read_head(key, size) == data[:size], (name, key, size)
            head, _ = unpack(data)
            if len(data) >= 28 or head.flag == 0:
                expected = float(np.atleast_1d(head.label)[0])
                assert first_label(reader.read_head(key, 28)) == pytest.approx(expected, abs=0)


def test_class_count_verdict_takes_the_labels_against_every_claim():
    rec = "x.rec"
    assert class_count_verdict(rec, {"p": 4}, None, 4) == (4, [], [])
    assert class_count_verdict(rec, {"p": 4, "n=5": 5}, None)[0] is None
    n, errors, notes = class_count_verdict(rec, {"p": 5, "n=4": 4}, 4, 5, requested="n=4")
    assert n == 4 and errors == [] and len(notes) == 2 and "surplus" in notes[1]
    n, errors, notes = class_count_verdict(rec, {"p": 4, "n=5": 5}, 4, 4, requested="n=5")
    assert errors == ["n=5 but the dataset has 4 classes (the labels of x.rec: max label 3 + 1)"] and notes == []
    n, errors, notes = class_count_verdict(rec, {}, 6, 4)
    assert n == 6 and errors == [] and "2 class(es) have no identity record" in notes[0]


def test_records_the_header_does_not_cover_are_said_to_be_unused(tmp_path, caplog):
    root = _write_insightface(tmp_path / "glint", extra_keys=(15, 16))
    with caplog.at_level(logging.WARNING):
        assert len(FaceRecordDataset(root)) == 9
    assert any("2 indexed record(s) lie outside the header's keys 0..14 and are not used (e.g. key 15)" in m
               for m in caplog.messages)


def test_inspect_counts_classes_from_the_labels_and_names_the_split_records(tmp_path, capsys, reads):
    root = _write_insightface(tmp_path / "glint")
    assert inspect_tool.main([str(root), "--json", "--no-progress"]) == 3  # a warning only
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 4 and report["class_count_errors"] == []
    assert report["identity_records"] == {"records": 5, "split_labels": [{"label": 2, "records": [2, 3]}]}
    assert "1 surplus identity record(s)" in report["warnings"][0] and report["range_disagreements"] == []
    image_reads = [key for kind, key in reads if 1 <= key <= 9]
    assert sorted(set(image_reads)) == list(range(1, 10)) and len(image_reads) <= 9 + len(RANGES)
    (root / "property").write_text("5,8,8")
    assert inspect_tool.main([str(root), "--no-progress"]) == 1  # training refuses that property
    out = capsys.readouterr().out
    assert "error: " + str(root / "property") + ": says 5 classes but the labels" in out
    assert "id records  5; label 2 starts records 2, 3" in out


def test_training_passes_data_num_classes_to_the_set_so_it_opens_without_reading_labels(tmp_path, reads):
    from partial_fc.train.data import open_dataset

    root, _ = _write_shuffled_im2rec(tmp_path / "dali")
    ds = open_dataset("recordio", root, on_bad_image="raise", label_check="warn", num_classes=8)
    assert ds.num_classes == 8 and reads == [("read", 0)]
    # a count too small for the labels is refused when a label beyond it is read, naming the source
    small = open_dataset("recordio", root, on_bad_image="skip", label_check="warn", num_classes=4)
    with pytest.raises(LabelError, match=r"label [4-7] outside \[0, 4\) \(the class count of data\.num_classes=4\)"):
        [small.label_of(i) for i in range(len(small))]
