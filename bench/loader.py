"""Data-loader benchmark: random record reads and the per-sample training pipeline. Prints JSON.

    python bench/loader.py [--root DIR] [--images 20000] [--reads 20000] [--samples 3000]

Builds (once, cached in --root) a synthetic InsightFace-layout set, then measures on one core:

- ``random_reads``: records/s of ``RecordIOReader.read`` + ``unpack`` at random keys, against a
  stand-in for MXNet's ``MXIndexedRecordIO.read_idx`` + ``mx.recordio.unpack`` (see
  ``MXNetStyleReader``: a seek and two buffered reads per frame, as dmlc-core's reader does, and
  mxnet's own Python unpack).
- ``pipeline``: images/s of read + decode + flip + normalise (``FaceRecordDataset`` with
  ``train_transform``), against a stand-in for insightface's ``MXFaceDataset`` (the stand-in
  reader, a Pillow decode in place of ``mx.image.imdecode``, then torchvision's ToPILImage,
  RandomHorizontalFlip, ToTensor and Normalize written out as torchvision implements them).
- ``dataloader``: images/s through a torch DataLoader with 1 and 2 worker processes.
- ``synthetic``: the synthetic generator's images per CPU second, and its wall-clock rate with 2
  worker processes.

Rates are given per CPU second of the measuring process (``process_time``; robust when the
machine is shared) and per wall-clock second. MXNet itself is not installed here, hence the
stand-ins; bench/RESULTS.md discusses what they mean.
"""
from __future__ import annotations

import argparse
import io
import json
import numbers
import os
import platform
import random
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from partial_fc.data import FaceRecordDataset, RecordIOReader, generate_synthetic, train_transform, unpack
from partial_fc.data.image import jpeg_backend

_MAGIC = 0xCED7230A
_IR_FORMAT = "IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)


class MXNetStyleReader:
    """Stand-in for ``mx.recordio.MXIndexedRecordIO``: .idx in a dict, one file handle, and per
    read a seek then dmlc-core's frame loop (read 8 header bytes, read the padded data, join
    split parts with the magic word)."""

    def __init__(self, idx_path, rec_path):
        self.idx = {}
        self.keys = []
        with open(idx_path) as f:
            for line in f:
                key, pos = line.strip().split("\t")
                self.idx[int(key)] = int(pos)
                self.keys.append(int(key))
        self.f = open(rec_path, "rb")

    def read_idx(self, key):
        self.f.seek(self.idx[key])
        return self.read()

    def read(self):
        out = b""
        while True:
            header = self.f.read(8)
            magic, lrec = struct.unpack("<II", header)
            if magic != _MAGIC:
                raise ValueError("Invalid RecordIO File")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            data = self.f.read((length + 3) & ~3)
            out += data[:length]
            if cflag in (0, 3):
                return out
            out += struct.pack("<I", _MAGIC)


def mxnet_unpack(s):
    """``mxnet.recordio.unpack`` as mxnet 1.9 writes it."""
    header = struct.unpack(_IR_FORMAT, s[:_IR_SIZE])
    s = s[_IR_SIZE:]
    flag, label, id_, id2 = header
    if flag > 0:
        label = np.frombuffer(s, np.float32, flag)
        s = s[flag * 4 :]
    return (flag, label, id_, id2), s


class MXFaceDatasetStandIn:
    """insightface ``MXFaceDataset.__getitem__`` with its torchvision transform, written out."""

    def __init__(self, root):
        self.imgrec = MXNetStyleReader(os.path.join(root, "train.idx"), os.path.join(root, "train.rec"))
        header, _ = mxnet_unpack(self.imgrec.read_idx(0))
        self.imgidx = np.array(range(1, int(header[1][0])))
        self.mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
        self.std = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)

    def __len__(self):
        return len(self.imgidx)

    def __getitem__(self, index):
        idx = self.imgidx[index]
        header, img = mxnet_unpack(self.imgrec.read_idx(int(idx)))
        label = header[1]
        if not isinstance(label, numbers.Number):
            label = label[0]
        label = torch.tensor(label, dtype=torch.long)
        with Image.open(io.BytesIO(img)) as im:  # mx.image.imdecode(img).asnumpy()
            sample = np.asarray(im.convert("RGB"))
        pic = Image.fromarray(sample)  # ToPILImage
        if random.random() < 0.5:  # RandomHorizontalFlip
            pic = pic.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(pic, np.uint8, copy=True))  # ToTensor
        t = t.view(pic.size[1], pic.size[0], 3).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        t = t.sub_(self.mean).div_(self.std)  # Normalize
        return t, label


def _compare(fn_a, fn_b, n, rounds=5):
    """Rates (calls per CPU second, per wall second) of two functions measured in alternating
    rounds of n // rounds calls each; reports the best round and the median round of each, and
    the speedup of a over b by best rounds (least disturbed by other load on the machine)."""
    per = max(n // rounds, 1)
    out = {"a": [], "b": []}
    for _ in range(rounds):
        for name, fn in (("a", fn_a), ("b", fn_b)):
            c0, w0 = time.process_time(), time.perf_counter()
            fn(per)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            out[name].append((per / max(cpu, 1e-9), per / max(wall, 1e-9)))

    def summary(rows):
        cpu = sorted(r[0] for r in rows)
        wall = sorted(r[1] for r in rows)
        return {"n": per * rounds, "per_cpu_s_best": round(cpu[-1], 1), "per_cpu_s_median": round(cpu[len(cpu) // 2], 1),
                "per_wall_s_best": round(wall[-1], 1)}

    a, b = summary(out["a"]), summary(out["b"])
    return a, b, round(a["per_cpu_s_best"] / b["per_cpu_s_best"], 2), round(a["per_cpu_s_median"] / b["per_cpu_s_median"], 2)


def bench_reads(root: Path, n: int, seed: int = 0):
    ours = RecordIOReader(root / "train.rec", root / "train.idx")
    theirs = MXNetStyleReader(root / "train.idx", root / "train.rec")
    keys = np.random.default_rng(seed).integers(1, len(ours) - 1, size=n).tolist()
    for k in keys[:2000]:  # warm the page cache for both
        ours.read(k)
        theirs.read_idx(k)

    def run_ours(m):
        for k in keys[:m]:
            unpack(ours.read(k))

    def run_theirs(m):
        for k in keys[-m:]:
            mxnet_unpack(theirs.read_idx(k))

    a, b, best, median = _compare(run_ours, run_theirs, n)
    return {"ours": a, "mxnet_standin": b, "speedup_best": best, "speedup_median": median}


def bench_pipeline(root: Path, n: int, seed: int = 0):
    ours = FaceRecordDataset(root, transform=train_transform())
    theirs = MXFaceDatasetStandIn(root)
    idx = np.random.default_rng(seed).integers(0, len(ours), size=n).tolist()
    for i in idx[:200]:
        ours[i]
        theirs[i]

    def run_ours(m):
        for i in idx[:m]:
            ours[i]

    def run_theirs(m):
        for i in idx[-m:]:
            theirs[i]

    a, b, best, median = _compare(run_ours, run_theirs, n)
    return {"ours": a, "mxface_standin": b, "speedup_best": best, "speedup_median": median}


def bench_dataloader(root: Path, n: int, workers: int, batch: int = 128):
    from torch.utils.data import DataLoader, RandomSampler

    ds = FaceRecordDataset(root, transform=train_transform())
    sampler = RandomSampler(ds, replacement=True, num_samples=n, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # start-up excluded
    t0 = time.perf_counter()
    seen = 0
    for images, _ in it:
        seen += images.shape[0]
    wall = time.perf_counter() - t0
    return {"workers": workers, "images": seen, "per_wall_s": round(seen / wall, 1),
            "per_worker_wall_s": round(seen / wall / workers, 1)}


def bench_synthetic(n: int, tmp: Path):
    """Synthetic generator: rendered + JPEG-encoded images per CPU second in one process, and the
    wall-clock rate of ``generate_synthetic`` with 2 worker processes."""
    from partial_fc.data.synthetic_faces import render_jpeg, sample_identities

    ids = sample_identities(8, 4, np.random.default_rng(0))
    c0 = time.process_time()
    for k in range(n):
        render_jpeg(ids[k % len(ids)], (0, 2, k % len(ids), k))
    one_core = n / (time.process_time() - c0)
    summary = generate_synthetic(tmp, num_identities=max(n // 20, 1), images_per_identity=20, family_size=4,
                                 num_pairs=0, workers=2, progress=False)
    return {"render_per_cpu_s": round(one_core, 1), "generate_2_workers_per_wall_s": summary["train_images_per_second"],
            "generate_images": summary["num_images"]}


def ensure_set(root: Path, images: int) -> dict:
    marker = root / "synthetic.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("num_images") == images:
            return info
    ids = max(images // 40, 1)
    return generate_synthetic(root, num_identities=ids, images_per_identity=images // ids,
                              num_heldout_identities=2, num_pairs=2, seed=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.environ.get("PFC_BENCH_DIR", "/tmp/pfc_bench_loader"))
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--reads", type=int, default=20000)
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--loader-images", type=int, default=4000)
    p.add_argument("--synthetic-images", type=int, default=2000)
    p.add_argument("--skip-dataloader", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.root)
    info = ensure_set(root, args.images)
    result = {
        "bench": "loader",
        "set": {"root": str(root), "images": info["num_images"], "classes": info["num_classes"],
                "rec_bytes": (root / "train.rec").stat().st_size},
        "jpeg_backend": jpeg_backend(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "random_reads": bench_reads(root, args.reads),
        "pipeline": bench_pipeline(root, args.samples),
    }
    if not args.skip_synthetic:
        result["synthetic"] = bench_synthetic(args.synthetic_images, root / "synthetic_rate")
    if not args.skip_dataloader:
        result["dataloader"] = [bench_dataloader(root, args.loader_images, w) for w in (1, 2)]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
