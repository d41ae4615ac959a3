"""Reading verification .bin files: the MXNet-era fixture, Python 2 pickles, and refusing code."""
import hashlib
import json
import pickle
import struct

import numpy as np
import pytest

from partial_fc.data import decode_image
from partial_fc.eval import load_bin
from partial_fc.eval.bin_format import read_bin_records

from tests.helpers.eval_synthetic_faces import make_pairs, write_bin


def test_fixture_pairs_bin_loads(fixtures_dir):
    path = fixtures_dir / "verification" / "pairs.bin"
    expected = json.loads((fixtures_dir / "verification" / "pairs.bin.json").read_text())
    encoded, _ = read_bin_records(path)
    assert [hashlib.sha256(b).hexdigest() for b in encoded] == expected["image_sha256"]

    images, issame = load_bin(path, progress=False)
    assert images.dtype == np.uint8 and images.shape == (40, 112, 112, 3)
    assert issame.dtype == bool and issame.tolist() == expected["issame"]
    for i in (0, 17, 39):
        np.testing.assert_array_equal(images[i], decode_image(encoded[i]))


def _python2_pickle(images, issame):
    """Bytes as Python 2's cPickle writes (images, issame) with protocol 2: str as BINSTRING."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    out += b"]("  # EMPTY_LIST, MARK
    for img in images:
        if len(img) < 256:
            out += b"U" + bytes([len(img)]) + img  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(img)) + img  # BINSTRING
    out += b"e]("  # APPENDS, EMPTY_LIST, MARK
    for flag in issame:
        out += b"\x88" if flag else b"\x89"  # NEWTRUE / NEWFALSE
    out += b"e\x86."  # APPENDS, TUPLE2, STOP
    return bytes(out)


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5, "python2"])
def test_loads_every_pickle_flavour(tmp_path, protocol):
    images, issame = make_pairs(5, seed=1)
    path = tmp_path / "set.bin"
    if protocol == "python2":
        path.write_bytes(_python2_pickle(images, issame))
    else:
        write_bin(path, images, issame, protocol=protocol)
    got_images, got_issame = load_bin(path, progress=False)
    assert got_issame.tolist() == issame
    assert got_images.shape == (10, 112, 112, 3)
    for i, blob in enumerate(images):
        np.testing.assert_array_equal(got_images[i], decode_image(blob))


def test_short_images_in_a_python2_pickle(tmp_path):
    # A tiny PNG (< 256 bytes) exercises SHORT_BINSTRING.
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    path = tmp_path / "tiny.bin"
    path.write_bytes(_python2_pickle([buf.getvalue()] * 2, [True]))
    images, issame = load_bin(path, progress=False)
    assert images.shape == (2, 4, 4, 3) and (images == [10, 20, 30]).all() and issame.tolist() == [True]
    resized, _ = load_bin(path, image_size=(8, 6), progress=False)
    assert resized.shape == (2, 8, 6, 3)


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _CallsSystem:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("where", ["images", "issame", "top"])
def test_pickle_that_calls_a_function_is_refused(tmp_path, where):
    marker = tmp_path / "function_ran"
    images, issame = make_pairs(2, seed=2)
    evil = _WritesMarker(marker)
    if where == "images":
        obj = (images[:3] + [evil], issame)
    elif where == "issame":
        obj = (images, [evil, False])
    else:
        obj = evil
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        load_bin(path, progress=False)
    assert not marker.exists()


def test_other_globals_and_codec_tricks_are_refused(tmp_path):
    path = tmp_path / "system.bin"
    path.write_bytes(pickle.dumps(([_CallsSystem()], []), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global (posix|nt|os)\.system"):
        load_bin(path, progress=False)
    # _codecs.encode is admitted only as Python 3's latin-1 encoding of bytes, nothing else.
    rot13 = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00rot_13\x86R]\x86."
    path.write_bytes(rot13)
    with pytest.raises(pickle.UnpicklingError, match="only _codecs.encode"):
        load_bin(path, progress=False)
    # bytes(<int>) would allocate arbitrary memory: refused as well.
    huge = b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x7f\x85R]\x86."
    path.write_bytes(huge)
    with pytest.raises(pickle.UnpicklingError, match="only bytes"):
        load_bin(path, progress=False)


def test_bad_layouts_name_the_file(tmp_path):
    images, issame = make_pairs(3, seed=3)
    cases = {
        "count.bin": (images[:5], issame),
        "ints.bin": (images, [1, 0, 1]),
        "text.bin": (["not bytes"] * 6, issame),
        "single.bin": [images],
    }
    for name, obj in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj))
        with pytest.raises(ValueError, match=name):
            load_bin(path, progress=False)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(pickle.dumps((images, issame))[:500])
    with pytest.raises((ValueError, pickle.UnpicklingError), match="truncated.bin"):
        load_bin(truncated, progress=False)
    broken = tmp_path / "broken.bin"
    write_bin(broken, [b"\xff\xd8 not a jpeg"] * 2, [True])
    with pytest.raises(ValueError, match="broken.bin: image 0"):
        load_bin(broken, progress=False)
