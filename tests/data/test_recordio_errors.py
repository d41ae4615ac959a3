"""Corrupted RecordIO files give RecordIOError naming the file, the key and the byte offset."""
from __future__ import annotations

import re
import struct

import pytest

from partial_fc.data import FaceRecordDataset, LabelError, RecordIOError, RecordIOReader

MAGIC = struct.pack("<I", 0xCED7230A)


def _offsets(root):
    return {int(k): int(v) for k, v in (l.split("\t") for l in (root / "train.idx").read_text().splitlines())}


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_flipped_magic(insightface_copy):
    off = _offsets(insightface_copy)[7]
    _patch(insightface_copy / "train.rec", off, b"\x0b")
    reader = RecordIOReader(insightface_copy / "train.rec")
    with pytest.raises(RecordIOError, match=r"train\.rec: key 7: offset %d: bad magic" % off) as info:
        reader.read(7)
    assert (info.value.key, info.value.offset) == (7, off)
    assert reader.read(6) and reader.read(8)  # neighbours are untouched
    ds = FaceRecordDataset(insightface_copy, on_bad_image="skip")
    with pytest.raises(RecordIOError):  # framing damage is never skipped silently
        ds[6]


def test_truncated_tail(insightface_copy):
    rec = insightface_copy / "train.rec"
    offs = _offsets(insightface_copy)
    rec.write_bytes(rec.read_bytes()[: offs[24] + 100])  # cut inside image 24; identity records gone
    size = offs[24] + 100
    # the .idx names records past the cut: the first check names its line, key, offset and the size
    with pytest.raises(RecordIOError, match=rf"train\.idx: line 26: key 25: offset {offs[25]} lies past the end "
                                            rf"of train\.rec \({size} bytes\): the \.rec is shorter than its "
                                            r"\.idx says"):
        RecordIOReader(rec)
    with pytest.raises(RecordIOError, match="line 26: key 25"):
        FaceRecordDataset(insightface_copy)
    # an .idx of the records that start before the cut: the cut record is named when read
    idx = insightface_copy / "train.idx"
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in offs.items() if o < size))
    reader = RecordIOReader(rec)
    with pytest.raises(RecordIOError, match=r"key 24: offset %d: truncated record" % offs[24]):
        reader.read(24)
    assert reader.read(23)


def test_damaged_length_never_reads_into_the_next_record(insightface_copy):
    rec = insightface_copy / "train.rec"
    offs = _offsets(insightface_copy)
    raw = rec.read_bytes()
    (lrec,) = struct.unpack_from("<I", raw, offs[3] + 4)
    for new_len in (lrec + 8, lrec - 8):
        _patch(rec, offs[3] + 4, struct.pack("<I", new_len))
        reader = RecordIOReader(rec)
        with pytest.raises(RecordIOError, match=r"key 3: offset %d" % offs[3]):
            reader.read(3)
        assert reader.read(4)


def test_broken_part_sequence(insightface_copy):
    rec = insightface_copy / "train.rec"
    offs = _offsets(insightface_copy)
    raw = rec.read_bytes()
    # key 5 is split: its second frame has cflag 2; make it a fresh start (cflag 1 -> "0")
    first_len = struct.unpack_from("<I", raw, offs[5] + 4)[0] & (2**29 - 1)
    second = offs[5] + 8 + (first_len + 3) // 4 * 4
    (lrec,) = struct.unpack_from("<I", raw, second + 4)
    assert lrec >> 29 == 2
    _patch(rec, second + 4, struct.pack("<I", lrec & (2**29 - 1)))
    with pytest.raises(RecordIOError, match=r"key 5: offset %d: broken part sequence" % offs[5]):
        RecordIOReader(rec).read(5)
    # a record that starts with a continuation flag
    (lrec,) = struct.unpack_from("<I", raw, offs[2] + 4)
    _patch(rec, offs[2] + 4, struct.pack("<I", lrec | (3 << 29)))
    with pytest.raises(RecordIOError, match=r"key 2: offset %d: broken part sequence" % offs[2]):
        RecordIOReader(rec).read(2)


def test_missing_idx_file_is_rebuilt_by_a_scan(insightface_copy, recordio_fixtures):
    (insightface_copy / "train.idx").unlink()
    ds = FaceRecordDataset(insightface_copy, save_index=True)
    ref = FaceRecordDataset(recordio_fixtures / "insightface")
    assert len(ds) == len(ref) and ds.num_classes == ref.num_classes
    for i in (0, 4, 9, 23):
        assert ds.read_record(i)[1] == ref.read_record(i)[1] and ds[i][1] == ref[i][1]
    assert (insightface_copy / "train.idx").read_text() == (recordio_fixtures / "insightface" / "train.idx").read_text()


def test_key_missing_from_idx(insightface_copy):
    idx = insightface_copy / "train.idx"
    idx.write_text("".join(l for l in idx.read_text().splitlines(True) if not l.startswith("9\t")))
    reader = RecordIOReader(insightface_copy / "train.rec", idx)
    with pytest.raises(RecordIOError, match=r"train\.rec: key 9: key not found in .*train\.idx"):
        reader.read(9)
    with pytest.raises(RecordIOError, match="key 9"):
        FaceRecordDataset(insightface_copy)


def test_offset_past_end_and_malformed_idx(insightface_copy):
    idx = insightface_copy / "train.idx"
    size = (insightface_copy / "train.rec").stat().st_size
    lines = idx.read_text().splitlines(True)
    lines[4] = "4\t999999\n"
    idx.write_text("".join(lines))
    with pytest.raises(RecordIOError, match=rf"train\.idx: line 5: key 4: offset 999999 lies past the end of "
                                            rf"train\.rec \({size} bytes\)"):
        RecordIOReader(insightface_copy / "train.rec")
    lines[4] = "4\tnot-a-number\n"
    idx.write_text("".join(lines))
    with pytest.raises(RecordIOError, match=r"train\.idx: malformed \.idx line 5"):
        RecordIOReader(insightface_copy / "train.rec")


@pytest.mark.parametrize("line,message", [
    # apache/mxnet#8103: offsets that read 2^64-1 were only "malformed .idx file"
    ("4\t18446744073709551615", r"line 5: key 4: offset 18446744073709551615 lies past the end of train\.rec "
                               r"\(\d+ bytes\) \(2\^64-1: a -1 written as unsigned\)"),
    ("4\t-7", r"line 5: key 4: negative offset -7"),
    ("99999999999999999999\t12", r"line 5: key 99999999999999999999 does not fit a 64-bit integer"),
    ("4\t12\t7", r"malformed \.idx line 5: '4\\t12\\t7'"),
    ("4\t1_000", r"malformed \.idx line 5"),
    ("3\t8", r"key 3 appears more than once \(lines 4, 5\)"),
])
def test_idx_entries_that_cannot_be_offsets_name_line_key_and_value(insightface_copy, line, message):
    idx = insightface_copy / "train.idx"
    lines = idx.read_text().splitlines(True)
    lines[4] = line + "\n"
    lines.insert(2, "\n")  # a blank line: line numbers count it
    idx.write_text("".join(lines))
    message = re.sub(r"line (\d+)", lambda m: f"line {int(m[1]) + 1}", message)
    message = message.replace("lines 4, 5", "lines 5, 6")
    for opener in (lambda: RecordIOReader(insightface_copy / "train.rec"), lambda: FaceRecordDataset(insightface_copy)):
        with pytest.raises(RecordIOError, match=rf"train\.idx: {message}"):
            opener()


def test_two_keys_on_one_record_name_their_lines(insightface_copy):
    idx = insightface_copy / "train.idx"
    lines = idx.read_text().splitlines(True)
    offset = lines[3].split("\t")[1]
    lines[4] = f"4\t{offset}"
    idx.write_text("".join(lines))
    with pytest.raises(RecordIOError, match=rf"train\.idx: key 4: offset {int(offset)}: keys 3 and 4 both point "
                                            rf"at offset {int(offset)} \(lines 4, 5\)"):
        RecordIOReader(insightface_copy / "train.rec")


def test_wrong_property(insightface_copy):
    # 7 claimed against 6 identity records: the labels are read and decide (max label 5 + 1)
    (insightface_copy / "property").write_text("7,112,112")
    with pytest.raises(LabelError, match=r"property: says 7 classes but the labels of .*train\.rec say 6 "
                                         r"\(max label 5 \+ 1\); correct it, or remove it"):
        FaceRecordDataset(insightface_copy)
    (insightface_copy / "property").write_text("6;112")
    with pytest.raises(LabelError, match="malformed property"):
        FaceRecordDataset(insightface_copy)
    (insightface_copy / "property").write_text("6,112,112")
    with pytest.raises(LabelError, match=r"num_classes=5 but the dataset has 6 classes \(the labels of "
                                         r".*train\.rec: max label 5 \+ 1\)"):
        FaceRecordDataset(insightface_copy, num_classes=5)
    with pytest.raises(LabelError, match=r"data\.num_classes=5 but the dataset has 6"):
        FaceRecordDataset(insightface_copy, num_classes=5, num_classes_key="data.num_classes")


def test_reader_is_safe_after_pickle(recordio_fixtures):
    import pickle

    reader = RecordIOReader(recordio_fixtures / "insightface" / "train.rec")
    first = reader.read(3)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(3) == first and clone.keys == reader.keys


def _read_all_in_child(reader, keys, queue):
    try:
        data = [reader.read(k) for k in keys]
        queue.put((data, reader._fd))
    except Exception as err:  # report instead of hanging the parent
        queue.put(repr(err))


def test_reader_reopens_in_forked_children_and_serves_threads(recordio_fixtures):
    """A reader opened before a fork reopens its own file in the child (the fork is noticed without
    a per-read getpid), and one reader serves many threads at once."""
    import multiprocessing as mp
    from concurrent.futures import ThreadPoolExecutor

    reader = RecordIOReader(recordio_fixtures / "insightface" / "train.rec")
    keys = list(reader.keys)
    want = [reader.read(k) for k in keys]
    parent_fd = reader._fd
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_all_in_child, args=(reader, keys, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert not isinstance(result, str), result
    data, child_fd = result
    assert data == want and child_fd is not None and child_fd != parent_fd
    assert reader.read(keys[3]) == want[3] and reader._fd == parent_fd  # the parent's file is untouched

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(reader.read, keys * 20))
    assert got == want * 20
