"""RecordIO reading/writing against files written by MXNet 1.9.1 itself (shared/fixtures)."""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from partial_fc.data import (
    FaceRecordDataset,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    decode_image,
    pack,
    unpack,
)


def _expected(recordio_fixtures, name):
    return json.loads((recordio_fixtures / name / "expected.json").read_text())


def test_insightface_records_match_expected(recordio_fixtures):
    exp = _expected(recordio_fixtures, "insightface")
    reader = RecordIOReader(recordio_fixtures / "insightface" / "train.rec",
                            recordio_fixtures / "insightface" / "train.idx")
    assert reader.keys == list(range(31))
    head, payload = unpack(reader.read(0))
    assert head.flag == exp["header"]["flag"] and payload == b""
    assert head.label.dtype == np.float32 and head.label.tolist() == exp["header"]["label"]
    for key_text, rec in exp["records"].items():
        head, payload = unpack(reader.read(int(key_text)))
        label = head.label.tolist() if head.flag > 0 else head.label
        assert label == rec["label"], key_text
        assert isinstance(head.label, np.ndarray) == isinstance(rec["label"], list)
        assert (head.id, head.id2) == (rec["id"], rec["id2"])
        assert len(payload) == rec["image_bytes"]
        assert hashlib.sha256(payload).hexdigest() == rec["image_sha256"]
        total = int(decode_image(payload).astype(np.int64).sum())
        assert abs(total - rec["pixel_sum"]) <= 0.005 * rec["pixel_sum"], key_text
    for cls, (start, end) in exp["identity_ranges"].items():
        head, payload = unpack(reader.read(25 + int(cls)))
        assert head.label.tolist() == [start, end] and payload == b""


def test_split_records_are_joined(recordio_fixtures):
    """Keys 5 and 10 hold the magic word at aligned offsets: MXNet split them into parts."""
    exp = _expected(recordio_fixtures, "insightface")
    reader = RecordIOReader(recordio_fixtures / "insightface" / "train.rec")
    raw = (recordio_fixtures / "insightface" / "train.rec").read_bytes()
    for key in (5, 10):
        assert exp["records"][str(key)]["has_aligned_magic"]
        off = reader.offset_of(key)
        lrec = struct.unpack_from("<I", raw, off + 4)[0]
        assert lrec >> 29 == 1  # the file really holds a split record here
        data = reader.read(key)
        assert struct.pack("<I", 0xCED7230A) in data
        _, payload = unpack(data)
        assert hashlib.sha256(payload).hexdigest() == exp["records"][str(key)]["image_sha256"]


def test_im2rec_layout(recordio_fixtures):
    exp = _expected(recordio_fixtures, "im2rec")
    ds = FaceRecordDataset(recordio_fixtures / "im2rec")
    assert ds.layout == "im2rec" and len(ds) == 5 and ds.num_classes == 3
    for i in range(len(ds)):
        rec = exp["records"][str(ds.key_of(i))]
        head, payload = ds.read_record(i)
        assert hashlib.sha256(payload).hexdigest() == rec["image_sha256"]
        image, label = ds[i]
        assert label == int(rec["label"]) and image.dtype == np.uint8 and image.shape[2] == 3


def test_bare_stream_iteration_and_scan(recordio_fixtures, tmp_path):
    exp = _expected(recordio_fixtures, "split")["payloads_hex"]
    rec = recordio_fixtures / "split" / "stream.rec"
    reader = RecordIOReader(rec, progress=False)
    assert [d.hex() for d in reader] == exp
    assert [reader.read(k).hex() for k in reader.keys] == exp
    saved = reader.save_index(tmp_path / "stream.idx")
    again = RecordIOReader(rec, saved)
    assert [again.read(k).hex() for k in again.keys] == exp
    # and the writer reproduces the stream byte for byte
    with RecordIOWriter(tmp_path / "copy.rec") as w:
        for d in exp:
            w.write_record(bytes.fromhex(d))
    assert (tmp_path / "copy.rec").read_bytes() == rec.read_bytes()


def test_repacking_insightface_fixture_is_byte_identical(recordio_fixtures, tmp_path):
    src = recordio_fixtures / "insightface"
    reader = RecordIOReader(src / "train.rec", src / "train.idx")
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in sorted(reader.keys):
            head, payload = unpack(reader.read(key))
            w.write(key, pack(head, payload))  # through pack/unpack, not just the raw bytes
    assert (tmp_path / "train.rec").read_bytes() == (src / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_bytes() == (src / "train.idx").read_bytes()


def test_pack_unpack_like_mxnet():
    data = pack(IRHeader(0, 3.0, 7, 9), b"xyz")
    assert data == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"xyz"
    data = pack(IRHeader(123, [1.0, 2.5], 7, 0), b"p")  # flag is recomputed from the label size
    assert data == struct.pack("<IfQQ", 2, 0.0, 7, 0) + np.array([1, 2.5], np.float32).tobytes() + b"p"
    head, payload = unpack(data)
    assert head.flag == 2 and head.label.tolist() == [1.0, 2.5] and payload == b"p"
    with pytest.raises(ValueError):
        unpack(struct.pack("<IfQQ", 5, 0.0, 0, 0) + b"\0" * 8)  # announces 5 labels, holds 2


@pytest.mark.parametrize("payload_hex", ["", "0a23d7ce", "000a23d7ce", "0a23d7ce0a23d7ce", "0a23d7"])
def test_writer_splits_at_aligned_magic_only(tmp_path, payload_hex):
    payload = bytes.fromhex(payload_hex)
    with RecordIOWriter(tmp_path / "x.rec", tmp_path / "x.idx") as w:
        w.write(0, payload)
        w.write(1, b"tail")
    raw = (tmp_path / "x.rec").read_bytes()
    assert len(raw) % 4 == 0
    reader = RecordIOReader(tmp_path / "x.rec", tmp_path / "x.idx")
    assert reader.read(0) == payload and reader.read(1) == b"tail"
    flags = []
    pos = 0
    while pos < reader.offset_of(1):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        flags.append(lrec >> 29)
        pos += 8 + ((lrec & (2**29 - 1)) + 3) // 4 * 4
    aligned = sum(payload[i : i + 4] == bytes.fromhex("0a23d7ce") for i in range(0, len(payload) // 4 * 4, 4))
    assert flags == ([0] if aligned == 0 else [1] + [2] * (aligned - 1) + [3])
