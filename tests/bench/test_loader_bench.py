"""bench/loader.py runs end to end on a tiny set and prints the JSON it documents (no timings
are asserted); its MXNet-style stand-in reads what our reader reads."""
import json

import numpy as np

from partial_fc.data import RecordIOReader, unpack

from tests.helpers.bench_scripts import load_bench_script

bench = load_bench_script("loader")


def test_loader_bench_prints_its_json(tmp_path, capsys):
    root = tmp_path / "set"
    assert bench.main(["--root", str(root), "--images", "200", "--reads", "100", "--samples", "50",
                       "--loader-images", "300", "--synthetic-images", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["set"]["images"] == 200
    assert {"ours", "mxnet_standin", "speedup"} <= set(out["random_reads"])
    pipeline = out["pipeline"]
    assert {"train_transform", "uint8_for_device", "mxface_reference"} <= set(pipeline)
    assert set(pipeline["reference"]) == {"decode", "transform"}
    assert [(r["batches"], r["workers"]) for r in out["dataloader"]] == [
        (kind, w) for kind in ("uint8", "float32", "mxface_reference") for w in (1, 2)]
    assert all(r["images"] == 300 - 128 for r in out["dataloader"])  # the first batch is not timed
    assert out["synthetic"]["generate_images"] > 0

    ours = RecordIOReader(root / "train.rec", root / "train.idx")
    theirs = bench.MXNetStyleReader(root / "train.idx", root / "train.rec")
    for key in (1, 57, 199):
        head, payload = unpack(ours.read(key))
        (flag, label, id_, _), their_payload = bench.mxnet_unpack(theirs.read_idx(key))
        assert (flag, id_, their_payload) == (head.flag, head.id, payload)
        assert np.asarray(label).tolist() == np.asarray(head.label).tolist()
    reference = bench.MXFaceDatasetReference(root)
    image, label = reference[0]
    assert tuple(image.shape) == (3, 112, 112) and -1.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert int(label) == unpack(ours.read(1))[0].label
