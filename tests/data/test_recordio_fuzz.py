"""Seeded byte mutations of the MXNet-written fixture: the reader never hangs, crashes or reads
across a record's frame; framing damage raises RecordIOError naming the key and offset; payload
damage surfaces as a bad sample that follows on_bad_image, and labels never shift."""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from partial_fc.data import BadSampleError, FaceRecordDataset, LabelError, RecordIOError, RecordIOReader

NUM_REC_MUTATIONS = 300
NUM_IDX_MUTATIONS = 60


def _byte_map(raw: bytes, offsets: dict):
    """Per byte of the file: (key, kind) with kind 'frame' (magic + lrec), 'data' or 'pad'."""
    owner = np.zeros(len(raw), dtype=np.int64)
    kind = np.empty(len(raw), dtype=object)
    for key, start in offsets.items():
        pos = start
        while True:
            magic, lrec = struct.unpack_from("<II", raw, pos)
            length, cflag = lrec & (2**29 - 1), lrec >> 29
            stop = pos + 8 + (length + 3) // 4 * 4
            owner[pos:stop] = key
            kind[pos : pos + 8] = "frame"
            kind[pos + 8 : pos + 8 + length] = "data"
            kind[pos + 8 + length : stop] = "pad"
            pos = stop
            if cflag in (0, 3):
                break
    return owner, kind


class _Fixture:
    def __init__(self, src):
        self.rec = (src / "train.rec").read_bytes()
        self.idx = (src / "train.idx").read_text()
        self.prop = (src / "property").read_text()
        self.offsets = {int(k): int(v) for k, v in (l.split("\t") for l in self.idx.splitlines())}
        reader = RecordIOReader(src / "train.rec", src / "train.idx")
        self.data = {k: reader.read(k) for k in reader.keys}
        ds = FaceRecordDataset(src)
        self.labels = {ds.key_of(i): ds.label_of(i) for i in range(len(ds))}
        self.owner, self.kind = _byte_map(self.rec, self.offsets)

    def write(self, root, rec=None, idx=None):
        (root / "train.rec").write_bytes(self.rec if rec is None else rec)
        (root / "train.idx").write_text(self.idx if idx is None else idx)
        (root / "property").write_text(self.prop)


@pytest.fixture(scope="module")
def fixture_bytes(recordio_fixtures):
    return _Fixture(recordio_fixtures / "insightface")


def _check_read(reader, key, fx, damaged_key, damaged_kind):
    """read(key) on a mutated file: the original bytes, or a RecordIOError naming key and offset
    when this key's framing was damaged."""
    try:
        data = reader.read(key)
    except RecordIOError as err:
        assert key == damaged_key, f"key {key} failed but the damage was in key {damaged_key}: {err}"
        assert damaged_kind == "frame", f"{damaged_kind} damage raised a framing error: {err}"
        assert f"key {key}" in str(err) and f"offset {fx.offsets[key]}" in str(err), str(err)
        return None
    orig = fx.data[key]
    if key != damaged_key or damaged_kind == "pad":
        assert data == orig, f"key {key} changed although the damage was elsewhere"
    elif damaged_kind == "frame":
        # the only framing change that cannot be seen: a length that moves within the zero
        # padding of the last frame; the record then gains zero bytes or loses at most 3 bytes
        assert (data.startswith(orig) and set(data[len(orig):]) <= {0}) or (
            orig.startswith(data) and len(orig) - len(data) <= 3
        ), f"key {key}: framing damage produced other bytes"
    else:
        assert len(data) == len(orig) and sum(a != b for a, b in zip(data, orig)) <= 1
    return data


def _check_dataset(root, fx, damaged_key) -> int:
    """Open the mutated dataset under both policies; returns how many bad samples were met."""
    metadata_keys = {0} | set(range(25, 31))
    bad = 0
    for policy in ("raise", "skip"):
        try:
            ds = FaceRecordDataset(root, on_bad_image=policy, return_key=True)
        except (RecordIOError, LabelError) as err:
            assert damaged_key in metadata_keys, f"opening failed for damage in image key {damaged_key}: {err}"
            return bad
        # every item under "raise"; under "skip" the damaged item and its neighbours
        indices = range(len(ds)) if policy == "raise" else [
            i for i in range(len(ds)) if abs(ds.key_of(i) - damaged_key) <= 1
        ]
        for i in indices:
            key = ds.key_of(i)
            try:
                item = ds[i]
            except RecordIOError as err:
                assert key == damaged_key and f"key {key}" in str(err)
                continue
            except (BadSampleError, LabelError) as err:
                assert policy == "raise" or isinstance(err, LabelError)
                assert key == damaged_key and f"key {key}" in str(err), str(err)
                bad += 1
                continue
            if item is None:  # skipped, and nothing served in its place
                assert policy == "skip" and key == damaged_key
                bad += 1
                continue
            image, label, got_key = item
            assert label == fx.labels[got_key], "label shifted"
            assert got_key == key or key == damaged_key
            assert image.dtype == np.uint8 and image.ndim == 3
            bad += got_key != key
    return bad


def test_fuzz_record_bytes(fixture_bytes, tmp_path):
    fx = fixture_bytes
    rng = np.random.default_rng(2024)
    root = tmp_path / "ds"
    root.mkdir()
    kinds_seen = set()
    framing_errors = bad_samples = 0
    for trial in range(NUM_REC_MUTATIONS):
        raw = bytearray(fx.rec)
        if trial % 10 == 9:  # cut the tail somewhere
            cut = int(rng.integers(1, len(raw)))
            raw = raw[:cut]
            fx.write(root, rec=bytes(raw))
            past = [k for k, off in fx.offsets.items() if off >= cut]
            if past:  # the .idx names records the cut removed: refused at open, naming the first
                first = min(past, key=fx.offsets.get)
                with pytest.raises(RecordIOError, match=rf"train\.idx: line \d+: key {first}: offset "
                                                        rf"{fx.offsets[first]} lies past the end"):
                    RecordIOReader(root / "train.rec", root / "train.idx")
                kept = "".join(f"{k}\t{off}\n" for k, off in fx.offsets.items() if off < cut)
                fx.write(root, rec=bytes(raw), idx=kept)
            reader = RecordIOReader(root / "train.rec", root / "train.idx")
            for key, off in fx.offsets.items():
                if off >= cut:
                    assert key not in reader
                    continue
                try:
                    data = reader.read(key)
                    assert data == fx.data[key]
                except RecordIOError as err:
                    last = max(i for i in range(len(fx.owner)) if fx.owner[i] == key)
                    assert last >= cut, f"key {key} ends before the cut but failed: {err}"
                    assert f"key {key}" in str(err) and f"offset {off}" in str(err)
            continue
        # aim at the small framing and padding regions often enough to cover them well
        if trial % 3 == 0:
            pos = int(rng.choice(np.flatnonzero(fx.kind == "frame")))
        elif trial % 9 == 1:
            pos = int(rng.choice(np.flatnonzero(fx.kind == "pad")))
        else:
            pos = int(rng.integers(0, len(raw)))
        raw[pos] ^= int(rng.integers(1, 256))
        key, kind = int(fx.owner[pos]), fx.kind[pos]
        kinds_seen.add(kind)
        fx.write(root, rec=bytes(raw))
        t0 = time.perf_counter()
        reader = RecordIOReader(root / "train.rec", root / "train.idx")
        for k in fx.offsets:
            if _check_read(reader, k, fx, key, kind) is None:
                framing_errors += 1
        bad_samples += _check_dataset(root, fx, key)
        assert time.perf_counter() - t0 < 10.0, "reading a mutated file took too long"
    assert kinds_seen >= {"frame", "data", "pad"}
    assert framing_errors >= NUM_REC_MUTATIONS // 4 and bad_samples > 10  # the damage was noticed


def test_fuzz_idx_bytes(fixture_bytes, tmp_path):
    fx = fixture_bytes
    rng = np.random.default_rng(7)
    root = tmp_path / "ds"
    root.mkdir()
    for trial in range(NUM_IDX_MUTATIONS):
        text = list(fx.idx)
        pos = int(rng.integers(0, len(text)))
        choice = rng.random()
        if choice < 0.6 and text[pos].isdigit():
            text[pos] = str((int(text[pos]) + int(rng.integers(1, 10))) % 10)
        elif choice < 0.8:
            del text[pos]
        else:
            text[pos] = chr(int(rng.integers(33, 127)))
        idx = "".join(text)
        fx.write(root, idx=idx)
        try:
            reader = RecordIOReader(root / "train.rec", root / "train.idx")
        except RecordIOError as err:
            assert "train.idx" in str(err)
            continue
        index = dict(zip(reader.keys, (reader.offset_of(k) for k in reader.keys)))
        for key in reader.keys:
            try:
                data = reader.read(key)
            except RecordIOError as err:
                assert f"key {key}" in str(err) and f"offset {index[key]}" in str(err), str(err)
                continue
            # a successful read is exactly the record that starts at the indexed offset (a damaged
            # key digit can rename a record; the dataset below catches the missing key)
            by_offset = {off: fx.data[k] for k, off in fx.offsets.items()}
            assert data == by_offset.get(index[key]), f"key {key} read bytes across a frame"
        try:
            ds = FaceRecordDataset(root, return_key=True)
        except (RecordIOError, LabelError):
            continue
        for i in range(len(ds)):
            try:
                _, label, key = ds[i]
            except RecordIOError:
                continue
            assert label == fx.labels[key]
