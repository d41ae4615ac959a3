"""MXNet RecordIO: reader, writer and the image-record header, byte-compatible with dmlc-core.

File layout (little-endian), as dmlc-core writes it::

    record = uint32 magic 0xCED7230A | uint32 lrec | data | zero pad to a multiple of 4 bytes
    length = lrec & (2**29 - 1);  cflag = lrec >> 29

cflag 0 is a whole record. The writer splits a record wherever the magic word occurs at a
4-byte-aligned offset of its data: the parts carry cflag 1 (first), 2 (middle), 3 (last), the magic
word itself is dropped and the reader puts it back between the parts. A ``.idx`` file holds text
lines ``key<TAB>byte offset`` of each record's first frame.

An image record's data is ``IRHeader`` (struct ``<IfQQ``: flag, label, id, id2), then ``flag``
float32 labels when ``flag > 0`` (the header's label field is then 0), then the payload.
"""
from __future__ import annotations

import logging
import mmap
import numbers
import os
import re
import struct
import threading
import warnings
from array import array
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "pack",
    "unpack",
    "first_label",
    "read_idx_file",
]

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
_MAX_RECORD = 1 << 29
_IR_FORMAT = struct.Struct("<IfQQ")
IR_SIZE = _IR_FORMAT.size

PathLike = Union[str, os.PathLike]


_forks_seen = [0]  # forks between the first reader's process and this one (see _watch_forks)
_fork_hook = []


def _count_fork():
    _forks_seen[0] += 1


def _watch_forks():
    """Count forks with an ``os.register_at_fork`` hook (registered once, on first use), so a
    reader notices it runs in a forked child by comparing one integer, not by an ``os.getpid()``
    system call on every read."""
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_count_fork)
        _fork_hook.append(True)


class RecordIOError(ValueError):
    """A RecordIO file (or its .idx) is malformed; the message names the file, key and offset."""

    def __init__(self, message: str, path: Optional[PathLike] = None, key=None, offset=None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if key is not None:
            parts.append(f"key {key}")
        if offset is not None:
            parts.append(f"offset {offset}")
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)
        self.path = None if path is None else str(path)
        self.key = key
        self.offset = offset


class IRHeader(NamedTuple):
    """Image-record header. ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: Union[float, np.ndarray]
    id: int
    id2: int


_new_tuple = tuple.__new__


def pack(header, payload: bytes) -> bytes:
    """Serialise ``header`` and ``payload`` into record data, exactly as ``mxnet.recordio.pack``.

    A scalar label gives flag 0; an array label gives ``flag = label.size`` and the labels are
    written as float32 after the header (whose label field is then 0).
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        head = _IR_FORMAT.pack(0, float(header.label), header.id, header.id2)
        return head + bytes(payload)
    labels = np.asarray(header.label, dtype=np.float32).reshape(-1)
    head = _IR_FORMAT.pack(labels.size, 0.0, header.id, header.id2)
    return head + labels.tobytes() + bytes(payload)


def unpack(record: bytes):
    """Split record data into ``(IRHeader, payload)`` as ``mxnet.recordio.unpack`` does.

    Raises ``ValueError`` when the data is too short for the header and its labels.
    """
    if len(record) < IR_SIZE:
        raise ValueError(f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    fields = _IR_FORMAT.unpack_from(record, 0)
    flag = fields[0]
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if end > len(record):
            raise ValueError(
                f"IRHeader announces {flag} float32 labels but the record has only "
                f"{len(record) - IR_SIZE} bytes after the header"
            )
        labels = np.frombuffer(record, dtype=np.float32, count=flag, offset=IR_SIZE).copy()
        return IRHeader(flag, labels, fields[2], fields[3]), bytes(record[end:])
    # tuple.__new__ skips the namedtuple's Python-level constructor, half of unpack's time
    return _new_tuple(IRHeader, fields), bytes(record[IR_SIZE:])


def first_label(head: bytes) -> float:
    """The class label of record data that begins with an IRHeader: its label field, or with
    ``flag > 0`` the first float32 label after it (what ``unpack`` reads, from the first
    ``IR_SIZE + 4`` bytes). Raises ``ValueError`` when ``head`` is too short for it."""
    if len(head) < IR_SIZE:
        raise ValueError(f"record of {len(head)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label = struct.unpack_from("<If", head, 0)
    if flag == 0:
        return label
    if len(head) < IR_SIZE + 4:
        raise ValueError(f"IRHeader announces {flag} float32 labels but the record has only "
                         f"{len(head) - IR_SIZE} bytes after the header")
    return struct.unpack_from("<f", head, IR_SIZE)[0]


def _align4(n: int) -> int:
    return (n + 3) & ~3


_INT64_MAX = (1 << 63) - 1


def read_idx_file(idx_path: PathLike, rec_path: Optional[PathLike] = None):
    """Parse a ``.idx`` file into ``(keys, offsets)`` int64 arrays, in file order.

    Each non-blank line is ``key<TAB>offset`` (MXNet writes a TAB; any whitespace is accepted).
    Raises RecordIOError naming the line (and its key) of a malformed entry, of a key or offset
    that is not a 64-bit integer, and of an offset that cannot start a record of ``rec_path``:
    negative, or (when ``rec_path`` is given) at or past its end.
    """
    idx_path = Path(idx_path)
    rec = None if rec_path is None else (Path(rec_path).name, Path(rec_path).stat().st_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy only warns about an empty file
            table = np.loadtxt(idx_path, dtype=np.int64, comments=None, ndmin=2, encoding="ascii")
        if table.shape[1] != 2:
            raise ValueError
        keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    except (ValueError, OverflowError, UserWarning):  # find the line, in Python
        keys, offsets = _parse_idx_lines(idx_path, rec)
    bad = np.flatnonzero((offsets < 0) | (offsets >= (rec[1] if rec else _INT64_MAX)))
    if bad.size:
        i = int(bad[0])
        _raise_bad_offset(idx_path, _line_of_entry(idx_path, i), int(keys[i]), int(offsets[i]), rec)
    return keys, offsets


_IDX_INT = re.compile(r"[+-]?[0-9]+\Z")


def _parse_idx_lines(idx_path: Path, rec):
    """:func:`read_idx_file` line by line: RecordIOError naming the first line that is not
    ``key offset`` with a 64-bit key and an offset inside the ``.rec`` (``rec``: its name and
    size, or None)."""
    keys, offsets = [], []
    text = idx_path.read_text(encoding="ascii", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(_IDX_INT.match(f) for f in fields):
            raise RecordIOError(
                f"malformed .idx line {lineno}: {line[:80]!r} (expected 'key<TAB>offset')", idx_path)
        key, offset = int(fields[0]), int(fields[1])
        if not -_INT64_MAX - 1 <= key <= _INT64_MAX:
            raise RecordIOError(f"line {lineno}: key {key} does not fit a 64-bit integer", idx_path)
        if offset < 0 or offset >= (rec[1] if rec else _INT64_MAX):
            _raise_bad_offset(idx_path, lineno, key, offset, rec)
        keys.append(key)
        offsets.append(offset)
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


def _raise_bad_offset(idx_path: Path, lineno: int, key: int, offset: int, rec):
    """RecordIOError for ``offset`` on line ``lineno``; ``rec``: (name, size) of the .rec or None."""
    if offset < 0:
        what = f"negative offset {offset}"
    elif rec is not None:
        what = f"offset {offset} lies past the end of {rec[0]} ({rec[1]} bytes)"
        if offset <= _INT64_MAX:
            what += ": the .rec is shorter than its .idx says (an incomplete copy?)"
    else:
        what = f"offset {offset} does not fit a 64-bit file offset"
    if offset == (1 << 64) - 1:
        what += " (2^64-1: a -1 written as unsigned)"
    raise RecordIOError(f"line {lineno}: key {key}: {what}", idx_path)


def _line_of_entry(idx_path: Path, index: int) -> int:
    """1-based line number of the ``index``-th non-blank line of ``idx_path`` (for messages)."""
    seen = -1
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == index:
                    return lineno
    return seen + 1


def _idx_lines_of_key(idx_path: PathLike, key: int) -> list:
    """The line numbers of ``idx_path`` whose key is ``key`` (for messages)."""
    lines = []
    for lineno, line in enumerate(Path(idx_path).read_text(encoding="ascii", errors="replace").splitlines(), 1):
        fields = line.split()
        if fields and fields[0].lstrip("+-").isdigit() and int(fields[0]) == key:
            lines.append(lineno)
    return lines


class DuplicateOffsetError(ValueError):
    """Two keys of an index point at one record (``keys``: both; ``key``: the later one)."""

    def __init__(self, message, keys, offset):
        super().__init__(message)
        self.keys, self.key, self.offset = keys, keys[-1], offset


class DuplicateKeyError(ValueError):
    """A key appears more than once in an index."""

    def __init__(self, key):
        super().__init__(f"key {key} appears more than once")
        self.key = key


class _KeyIndex:
    """key -> (offset, end) lookup over numpy arrays (compact for millions of keys, shared by fork).

    ``end`` is where the next indexed record (in file order) begins, or the file size: a record
    must not extend past it.
    """

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, file_size: int):
        self.keys = keys
        self.offsets = offsets
        n = keys.size
        self._base = None
        self._sorted_keys = self._order = None
        if n and int(keys[-1]) - int(keys[0]) == n - 1 and np.all(np.diff(keys) == 1):
            self._base = int(keys[0])  # keys k0..k0+N-1 in order: direct indexing
        else:
            self._order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._order]
            same = self._sorted_keys[1:] == self._sorted_keys[:-1]
            if n > 1 and np.any(same):
                raise DuplicateKeyError(int(self._sorted_keys[1:][same][0]))
        uniq, first, counts = np.unique(offsets, return_index=True, return_counts=True)
        if uniq.size != offsets.size:
            # two keys on one record: one of them would silently read the other's data
            off = int(uniq[np.argmax(counts > 1)])
            dups = keys[offsets == off][:2].tolist()
            raise DuplicateOffsetError(f"keys {dups[0]} and {dups[1]} both point at offset {off}", dups, off)
        nxt = np.searchsorted(uniq, offsets, side="right")
        self.ends = np.where(nxt < uniq.size, uniq[np.minimum(nxt, max(uniq.size - 1, 0))], file_size)
        # an .idx can point past the end of a truncated file: no record may end beyond it
        self.ends = np.minimum(self.ends, file_size).astype(np.int64, copy=False)
        # array('q') hands out Python ints; indexing a numpy array makes a numpy scalar per read
        self.offset_at = array("q", self.offsets.astype(np.int64).tobytes())
        self.end_at = array("q", self.ends.tobytes())
        self.size = n

    def position(self, key) -> int:
        """Index of ``key`` in .idx order, or -1 when absent."""
        if type(key) is not int and (isinstance(key, bool) or not isinstance(key, numbers.Integral)):
            return -1
        k = int(key)
        if self._base is not None:
            i = k - self._base
            return i if 0 <= i < self.size else -1
        j = int(np.searchsorted(self._sorted_keys, k))
        if j < self._sorted_keys.size and int(self._sorted_keys[j]) == k:
            return int(self._order[j])
        return -1


class RecordIOReader:
    """Random-access and sequential reader for MXNet RecordIO files.

    ``read(key)`` returns the whole record data (split parts joined, the magic word put back).
    Reads go through a read-only mmap (or ``os.pread``), never a shared file position, so one
    reader is safe across threads and across DataLoader worker processes (fork); after a pickle
    (spawn) the file is reopened lazily.

    Without an ``.idx`` (``idx_path=None`` and no ``<stem>.idx`` beside the file), the index is
    built by one scan of the file (``build_index``); ``save_index`` writes it out.

    ``strict_framing`` (default on): a record must end exactly where the next indexed record
    starts, so a damaged length field is reported instead of reading into a neighbour's frame.
    Turn it off only for an .idx that deliberately lists a subset of the file's records (the
    record must then still end before the next indexed one).
    """

    def __init__(
        self,
        rec_path: PathLike,
        idx_path: Optional[PathLike] = None,
        *,
        build_index: bool = True,
        progress: bool = True,
        strict_framing: bool = True,
    ):
        self.rec_path = Path(rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.strict_framing = strict_framing
        self._file_size = self.rec_path.stat().st_size
        _watch_forks()
        self._fd = None
        self._mm = None
        self._opened_at = None  # _forks_seen[0] when the file was opened (per process)
        self._lock = threading.Lock()
        if idx_path is None:
            default_idx = self.rec_path.with_suffix(".idx")
            idx_path = default_idx if default_idx.is_file() else None
        self.idx_path = None if idx_path is None else Path(idx_path)
        if self.idx_path is not None:
            if not self.idx_path.is_file():
                raise FileNotFoundError(f"RecordIO index file not found: {self.idx_path}")
            keys, offsets = read_idx_file(self.idx_path, self.rec_path)
        elif build_index:
            offsets = self.scan_offsets(progress=progress)
            keys = np.arange(offsets.size, dtype=np.int64)
        else:
            keys = offsets = np.zeros(0, dtype=np.int64)
        self.has_index = self.idx_path is not None or build_index
        try:
            self._index = _KeyIndex(keys, offsets, self._file_size)
        except DuplicateOffsetError as err:
            raise RecordIOError(f"{err}{self._lines_of(err.keys)}", self.idx_path, key=err.key,
                                offset=err.offset) from None
        except DuplicateKeyError as err:
            raise RecordIOError(f"{err}{self._lines_of([err.key])}", self.idx_path) from None
        self._keys_list = None

    def _lines_of(self, keys) -> str:
        """' (lines a, b)': where ``keys`` stand in the .idx (for messages)."""
        if self.idx_path is None:
            return ""
        lines = sorted({n for key in keys for n in _idx_lines_of_key(self.idx_path, int(key))})
        return f" (lines {', '.join(map(str, lines))})" if lines else ""

    # ------------------------------------------------------------------ file access
    def _ensure_open(self):
        forks = _forks_seen[0]
        if self._opened_at == forks and (self._mm is not None or self._fd is not None):
            return
        with self._lock:
            if self._opened_at == forks and (self._mm is not None or self._fd is not None):
                return
            fd = os.open(self.rec_path, os.O_RDONLY)
            mm = None
            if self._file_size > 0:
                try:
                    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):
                    mm = None
            self._fd, self._mm, self._opened_at = fd, mm, forks

    def _pread(self, offset: int, size: int) -> bytes:
        self._ensure_open()
        if self._mm is not None:
            return self._mm[offset : offset + size]
        return os.pread(self._fd, size, offset)

    def close(self):
        """Release the mmap and the file descriptor (a later read reopens them)."""
        with self._lock:
            if self._mm is not None:
                self._mm.close()
            if self._fd is not None and self._opened_at == _forks_seen[0]:
                os.close(self._fd)
            self._mm = self._fd = self._opened_at = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._opened_at == _forks_seen[0]:
                self.close()
        except Exception:
            pass

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = state["_mm"] = state["_opened_at"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        _watch_forks()

    # ------------------------------------------------------------------ index
    @property
    def keys(self) -> list:
        """Record keys as Python ints, in .idx order."""
        if self._keys_list is None:
            self._keys_list = self._index.keys.tolist()
        return self._keys_list

    @property
    def key_array(self) -> np.ndarray:
        """Record keys as an int64 array, in .idx order (no copy; do not modify)."""
        return self._index.keys

    @property
    def file_size(self) -> int:
        return self._file_size

    def __len__(self) -> int:
        return int(self._index.keys.size)

    def __contains__(self, key) -> bool:
        return self._index.position(key) >= 0

    def offset_of(self, key) -> int:
        """Byte offset of ``key``'s first frame; RecordIOError when the key is not indexed."""
        return int(self._index.offsets[self._position_or_raise(key)])

    def _position_or_raise(self, key) -> int:
        pos = self._index.position(key)
        if pos < 0:
            where = self.idx_path if self.idx_path is not None else "the scanned index"
            raise RecordIOError(f"key not found in {where}", self.rec_path, key=key)
        return pos

    def read(self, key) -> bytes:
        """The data of record ``key`` (parts joined, magic words restored)."""
        index = self._index
        base = index._base
        if base is not None and type(key) is int and 0 <= key - base < index.size:
            pos = key - base  # dense keys: the common case, without a call
        else:
            pos = index.position(key)
            if pos < 0:
                self._position_or_raise(key)
        offset = index.offset_at[pos]
        limit = index.end_at[pos]
        if self._mm is None or self._opened_at != _forks_seen[0]:
            self._ensure_open()
        mm = self._mm
        # Fast path: one whole frame (cflag 0) that fills the space up to the next record.
        if mm is not None and offset + 8 <= limit:
            magic, lrec = _FRAME.unpack_from(mm, offset)
            if magic == MAGIC and lrec <= _LENGTH_MASK and offset + 8 + ((lrec + 3) & ~3) == limit:
                return mm[offset + 8 : offset + 8 + lrec]
        data, end = self._read_frames(offset, key=key, limit=limit)
        if self.strict_framing and end != limit:
            raise RecordIOError(
                f"record ends at byte {end} but the next indexed record starts at byte {limit}: "
                f"a damaged length field, or an .idx without the record at byte {end} "
                "(for an .idx that lists only some records, use strict_framing=False)",
                self.rec_path,
                key=key,
                offset=offset,
            )
        return data

    def read_head(self, key, size: int) -> bytes:
        """The first ``size`` bytes of record ``key``'s data (all of it when shorter): from its
        first frame alone when that holds them (a label without its image), else by ``read``."""
        pos = self._position_or_raise(key)
        offset, limit = self._index.offset_at[pos], self._index.end_at[pos]
        if offset + 8 <= limit:
            magic, lrec = _FRAME.unpack(self._pread(offset, 8))
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if magic == MAGIC and offset + 8 + _align4(length) <= limit and (
                    cflag == 0 or (cflag == 1 and length >= size)):
                return self._pread(offset + 8, min(length, size))
        return self.read(key)[:size]

    def read_at(self, offset: int) -> bytes:
        """The data of the record whose first frame starts at byte ``offset``."""
        data, _ = self._read_frames(offset, key=None, limit=self._file_size)
        return data

    def _read_frames(self, offset: int, key, limit: int):
        """Join the frames of the record at ``offset``; return (data, end offset).

        No frame may extend past ``limit`` (next record or file end).
        """
        size = self._file_size
        if offset < 0 or offset >= size:
            raise RecordIOError(
                f"offset is past the end of the file ({size} bytes)", self.rec_path, key, offset
            )
        parts = []
        pos = offset
        expect_continuation = False
        while True:
            if pos + 8 > limit:
                what = "file" if limit == size else "record (next record starts at byte %d)" % limit
                raise RecordIOError(
                    f"truncated record: frame header at byte {pos} runs past the end of the {what}",
                    self.rec_path, key, offset,
                )
            magic, lrec = _FRAME.unpack(self._pread(pos, 8))
            if magic != MAGIC:
                raise RecordIOError(
                    f"bad magic 0x{magic:08X} at byte {pos} (expected 0x{MAGIC:08X})",
                    self.rec_path, key, offset,
                )
            cflag = lrec >> 29
            length = lrec & _LENGTH_MASK
            if cflag > 3:
                raise RecordIOError(f"invalid part flag {cflag} at byte {pos}", self.rec_path, key, offset)
            if expect_continuation and cflag not in (2, 3):
                raise RecordIOError(
                    f"broken part sequence: part flag {cflag} at byte {pos} inside a split record "
                    "(expected 2 or 3)",
                    self.rec_path, key, offset,
                )
            if not expect_continuation and cflag not in (0, 1):
                raise RecordIOError(
                    f"broken part sequence: record starts with part flag {cflag} at byte {pos} "
                    "(expected 0 or 1)",
                    self.rec_path, key, offset,
                )
            stop = pos + 8 + _align4(length)
            if stop > limit:
                what = "file" if limit == size else "record (next record starts at byte %d)" % limit
                raise RecordIOError(
                    f"truncated record: frame at byte {pos} of length {length} runs past the end "
                    f"of the {what}",
                    self.rec_path, key, offset,
                )
            parts.append(self._pread(pos + 8, length))
            pos = stop
            if cflag in (0, 3):
                break
            expect_continuation = True
        data = parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)
        return data, pos

    def __iter__(self) -> Iterator[bytes]:
        """Records in file order (works on a bare .rec; ignores the .idx)."""
        for _, data in self.iter_with_offsets():
            yield data

    def iter_with_offsets(self) -> Iterator:
        """``(offset, data)`` of every record in file order."""
        pos = 0
        while pos < self._file_size:
            data, end = self._read_frames(pos, key=None, limit=self._file_size)
            yield pos, data
            pos = end

    def scan_offsets(self, progress: bool = True) -> np.ndarray:
        """Offsets of all records in file order, by one sequential scan (with a progress bar)."""
        offsets = []
        bar = None
        if progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=self._file_size, unit="B", unit_scale=True,
                           desc=f"indexing {self.rec_path.name}", leave=False, disable=None)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                bar = None
        pos = 0
        last = 0
        while pos < self._file_size:
            _, end = self._read_frames(pos, key=None, limit=self._file_size)
            offsets.append(pos)
            pos = end
            if bar is not None and pos - last > (1 << 24):
                bar.update(pos - last)
                last = pos
        if bar is not None:
            bar.update(pos - last)
            bar.close()
        return np.asarray(offsets, dtype=np.int64)

    def save_index(self, idx_path: PathLike) -> Path:
        """Write the current index as an MXNet ``.idx`` file (``key<TAB>offset`` lines)."""
        idx_path = Path(idx_path)
        lines = "".join(f"{k}\t{o}\n" for k, o in zip(self._index.keys.tolist(), self._index.offsets.tolist()))
        tmp = idx_path.with_name(idx_path.name + ".tmp")
        tmp.write_text(lines, encoding="ascii")
        os.replace(tmp, idx_path)
        return idx_path

    def __repr__(self):
        return f"RecordIOReader({str(self.rec_path)!r}, records={len(self)})"


class RecordIOWriter:
    """Writes RecordIO files byte-identical to MXNet's ``MXIndexedRecordIO`` / dmlc-core.

    ``write(key, record)`` appends one record and, when an ``idx_path`` is given, its
    ``key<TAB>offset`` line. Records are split where the magic word occurs at an aligned offset
    and zero-padded to 4 bytes, as dmlc-core's ``RecordIOWriter::WriteRecord`` does.
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n") if self.idx_path else None
        self._pos = 0
        self._keys = set()

    def tell(self) -> int:
        return self._pos

    def write(self, key, record: bytes) -> int:
        """Append ``record`` under ``key``; returns its byte offset."""
        if self._rec is None:
            raise ValueError(f"{self.rec_path}: writer is closed")
        if self._idx is not None:
            if isinstance(key, bool) or not isinstance(key, (numbers.Integral,)):
                raise TypeError(f"{self.rec_path}: RecordIO keys must be integers, got {key!r}")
            if key in self._keys:
                raise ValueError(f"{self.rec_path}: key {key} written twice")
            self._keys.add(int(key))
        offset = self._pos
        frames = encode_record(record)
        self._rec.write(frames)
        self._pos += len(frames)
        if self._idx is not None:
            self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def write_record(self, record: bytes) -> int:
        """Append a record without an .idx entry (a bare stream); returns its offset."""
        if self._rec is None:
            raise ValueError(f"{self.rec_path}: writer is closed")
        offset = self._pos
        frames = encode_record(record)
        self._rec.write(frames)
        self._pos += len(frames)
        return offset

    def close(self):
        if self._rec is not None:
            self._rec.close()
            self._rec = None
        if self._idx is not None:
            self._idx.close()
            self._idx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def encode_record(record: bytes) -> bytes:
    """The frames dmlc-core writes for one record (split at aligned magic words, padded)."""
    data = memoryview(bytes(record))
    n = len(data)
    if n >= _MAX_RECORD:
        raise ValueError(f"RecordIO records must be shorter than 2^29 bytes, got {n}")
    out = bytearray()
    start = 0
    search = bytes(data)
    i = search.find(_MAGIC_BYTES)
    lower_align = n & ~3
    while i != -1:
        if i % 4 == 0 and i + 4 <= lower_align:
            cflag = 1 if start == 0 else 2
            out += _FRAME.pack(MAGIC, (cflag << 29) | (i - start))
            out += data[start:i]
            start = i + 4
            i = search.find(_MAGIC_BYTES, i + 4)
        else:
            i = search.find(_MAGIC_BYTES, i + 1)
    cflag = 3 if start != 0 else 0
    out += _FRAME.pack(MAGIC, (cflag << 29) | (n - start))
    out += data[start:]
    out += b"\0" * (_align4(n) - n)
    return bytes(out)
