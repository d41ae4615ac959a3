"""Identity ranges that disagree with correct image labels (public Glint360K packs have them):
the image header's label is what trains, the ranges only count and warn."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from partial_fc.data import FaceRecordDataset, IRHeader, LabelError, RecordIOWriter, pack
from partial_fc.data.sampler import DistributedShardSampler
from partial_fc.tools import inspect as inspect_tool
from partial_fc.train.data import AugmentedFaces, BatchStream

from tests.helpers.data_files import jpeg_bytes

LABELS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # keys 1..12, correct
RANGES = [(1, 5), (5, 10), (10, 13)]  # identity 1's range wrongly holds key 9 (label 2)


def _write(root, labels=LABELS, ranges=RANGES, broken_key=None):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n, classes = len(labels), len(ranges)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        w.write(0, pack(IRHeader(2, [n + 1, n + 1 + classes], 0, 0), b""))
        for key, label in enumerate(labels, start=1):
            image = jpeg_bytes(rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8))
            w.write(key, pack(IRHeader(0, float(label), key, 0), image[:30] if key == broken_key else image))
        for c, (a, b) in enumerate(ranges):
            w.write(n + 1 + c, pack(IRHeader(2, [a, b], 0, 0), b""))
    (root / "property").write_text(f"{classes},8,8")
    return root


def test_the_image_label_trains_and_the_range_warns_or_raises(tmp_path, caplog):
    root = _write(tmp_path / "ds")
    with caplog.at_level(logging.WARNING):
        ds = FaceRecordDataset(root, return_key=True)  # default: warn
        served = [ds[i][1:] for i in range(len(ds))]
    assert served == [(label, key) for key, label in enumerate(LABELS, start=1)]
    assert ds.label_disagreements == 1 and ds.skipped == 0
    assert any("key 9" in r.message and "label 2, but key 9 lies in identity 1's range [5, 10)" in r.message
               for r in caplog.records)
    off = FaceRecordDataset(root)
    assert [off.label_of(i) for i in range(12)] == LABELS
    with pytest.raises(LabelError, match=r"train\.rec: key 9: offset \d+: label 2.*data\.label_check=warn"):
        FaceRecordDataset(root, check_labels="raise")[8]
    with pytest.raises(ValueError, match="check_labels must be one of"):
        FaceRecordDataset(root, check_labels=True)


@pytest.mark.parametrize("broken_key", [None, 6])
def test_skip_serves_every_good_key_in_full_batches_and_a_substitute_for_the_bad_one(tmp_path, broken_key):
    root = _write(tmp_path / "ds", broken_key=broken_key)
    base = FaceRecordDataset(root, on_bad_image="skip", return_key=True)

    class Keys:  # (image, key) so the batches say which keys were served
        def __len__(self):
            return len(base)

        def __getitem__(self, index):
            item = base[index]
            return None if item is None else (item[0], item[2])

    sampler = DistributedShardSampler(len(base), num_replicas=1, rank=0, seed=3)
    stream = BatchStream(AugmentedFaces(Keys(), seed=0), sampler, batch_size=4, num_workers=0)
    served = []
    for _ in range(3):
        _, keys = stream.next()
        assert len(keys) == 4  # the batch keeps its size
        served += keys.tolist()
        stream.advance(4)
    good = [k for k in range(1, 13) if k != broken_key]
    assert set(served) == set(good) and broken_key not in served
    assert len(served) - len(set(served)) == (broken_key is not None)  # one good key stood in
    assert sampler.exhausted  # the bad sample still used up its sampler position


def test_inspect_counts_by_label_and_lists_range_disagreements(tmp_path, capsys):
    root = _write(tmp_path / "ds")
    assert inspect_tool.main([str(root), "--verify", "--json", "--no-progress"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["broken"] == []
    assert [w["key"] for w in report["range_disagreements"]] == [9]
    ipi = report["images_per_identity"]
    assert (ipi["min"], ipi["max"]) == (4, 4)  # from the labels; the ranges say 4/5/3
    assert inspect_tool.main([str(root), "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert "1 label(s) disagree" in out and "key 9 offset" in out and "0 broken record(s)" in out
    broken = _write(tmp_path / "broken", broken_key=3)
    assert inspect_tool.main([str(broken), "--verify", "--json", "--no-progress"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [b["key"] for b in report["broken"]] == [3] and [w["key"] for w in report["range_disagreements"]] == [9]


def test_a_batch_of_only_bad_samples_says_so():
    from partial_fc.data.datasets import BadSampleError, drop_skipped

    assert drop_skipped([None, (np.zeros(2, np.uint8), 1)])[1].tolist() == [1]
    with pytest.raises(BadSampleError, match="all 2 samples of a batch were bad"):
        drop_skipped([None, None])
