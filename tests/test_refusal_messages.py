"""Every kind of input the product refuses names the file, the position in it (record/key, line,
image index, tensor) and what was expected against what was found."""
from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image

from partial_fc.data import FaceRecordDataset, IRHeader, RecordIOError, RecordIOWriter, pack
from partial_fc.data.packing import PackError, pack_dataset
from partial_fc.eval.bin_format import load_bin
from partial_fc.eval.ijb import read_ijb_meta
from partial_fc.train import checkpoint as ckpt


def _jpeg(path, side=8):
    Image.new("RGB", (side, side), (120, 60, 30)).save(path, format="JPEG")
    return path


def test_recordio_names_file_key_and_offset(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in range(3):
            w.write(key, pack(IRHeader(0, float(key), key, 0), b"x" * 100))
    raw = (tmp_path / "train.rec").read_bytes()
    (tmp_path / "train.rec").write_bytes(raw[:-50])  # the last record is cut
    ds = FaceRecordDataset(tmp_path, num_classes=3)
    with pytest.raises(RecordIOError, match=r"train\.rec.*key 2.*offset \d+"):
        ds[2]


def test_list_file_names_the_line_of_an_unreadable_image(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg\t0\nmissing.jpg\t0\n")
    with pytest.raises(PackError, match=rf"{lst}:2: {tmp_path}/missing\.jpg: cannot read"):
        pack_dataset(lst, tmp_path / "out", progress=False)
    lst.write_text("a.jpg\t0\na.jpg\tzero\n")
    with pytest.raises(PackError, match=rf"{lst}:2: label 'zero' is not a class index"):
        pack_dataset(lst, tmp_path / "out", progress=False)


def test_bin_names_the_image_that_does_not_decode(tmp_path):
    good = (tmp_path / "g.jpg")
    _jpeg(good)
    path = tmp_path / "pairs.bin"
    with open(path, "wb") as f:
        pickle.dump(([good.read_bytes(), b"\xff\xd8 broken"], [True]), f, protocol=4)
    with pytest.raises(ValueError, match=rf"{path}: image 1 cannot be decoded"):
        load_bin(path, progress=False)


def test_checkpoint_files_name_the_file_and_the_mismatch(tmp_path):
    shard = tmp_path / "shard_00000.pt"
    torch.save({"rows": torch.zeros(3)}, shard)
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ckpt.CheckpointError, match=rf"{shard}: not a readable checkpoint file \(40 bytes\)"):
        ckpt.load(shard)
    text = tmp_path.parent / f"{tmp_path.name}-README.md"
    text.write_text("# not a checkpoint\n")
    with pytest.raises(ckpt.CheckpointError, match=rf"{text}: not a readable checkpoint file .*found ") as err:
        ckpt.load(text)
    assert "weights_only" not in str(err.value)
    with pytest.raises(ckpt.CheckpointError, match=r"shard_00001\.pt: missing from the checkpoint \(the folder "
                                                   r"holds: shard_00000\.pt\)"):
        ckpt.load(tmp_path / "shard_00001.pt")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    state = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).state_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"trainer\.pt: the backbone does not fit this run's model "
                                                   r"\(\d shape\(s\) differ, e.g. 0\.weight: expected \(8, 4\), "
                                                   r"found \(6, 4\)"):
        ckpt.load_into(model, state, tmp_path / "trainer.pt", "backbone")


def test_onnx_model_that_does_not_load_is_named(tmp_path):
    pytest.importorskip("onnxruntime")
    from partial_fc.eval.onnx_model import OnnxBackbone

    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match=rf"{path}: not a loadable ONNX model \(21 bytes\)"):
        OnnxBackbone(path)


def test_ijb_metadata_names_the_line(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 1\n2.jpg two 1\n")
    (meta / "ijbc_name_5pts_score.txt").write_text(
        "".join(f"{n}.jpg " + " ".join(["1.0"] * 11) + "\n" for n in (1, 2)))
    (meta / "ijbc_template_pair_label.txt").write_text("1 1 1\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid\.txt:2: expected integer template and media ids, "
                                         r"got 'two 1'"):
        read_ijb_meta(tmp_path)
    (meta / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 1\n2.jpg 2 1\n")
    (meta / "ijbc_template_pair_label.txt").write_text("1 2 1\n\n1 2 7\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label\.txt:3: label must be 0 or 1, got 7"):
        read_ijb_meta(tmp_path)
