"""Data-loader benchmark: random record reads and the per-sample training pipeline. Prints JSON.

    python bench/loader.py [--root DIR] [--images 20000] [--reads 20000] [--samples 3000]

Builds (once, cached in --root) a synthetic InsightFace-layout set, then measures on one core:

- ``random_reads``: records/s of ``RecordIOReader.read`` + ``unpack`` at random keys, against a
  stand-in for MXNet's ``MXIndexedRecordIO.read_idx`` + ``mx.recordio.unpack`` (see
  ``MXNetStyleReader``: a seek and two buffered reads per frame, as dmlc-core's reader does, and
  mxnet's own Python unpack).
- ``pipeline``: images/s of read + decode + flip + normalise (``FaceRecordDataset`` with
  ``train_transform``), against insightface's ``MXFaceDataset.__getitem__`` (``reference``): the
  stand-in reader, ``mx.image.imdecode`` as OpenCV's ``imdecode`` + BGR->RGB (what MXNet runs
  inside it, without its NDArray overhead; Pillow when OpenCV is missing), then torchvision's own
  ``ToPILImage``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` (written out when
  torchvision is missing). Also the worker's share on the GPU path (read + decode + uint8 flip;
  the device normalises the batch) and ``normalize_batch`` per image on this CPU.
- ``dataloader``: images/s through a torch DataLoader with 1 and 2 worker processes: the
  trainer's uint8 batches (the device normalises), float32 batches (workers normalise), and the
  MXFaceDataset reference.
- ``synthetic``: the synthetic generator's images per CPU second, and its wall-clock rate with 2
  worker processes.

Rates are given per CPU second of the measuring process (``process_time``; robust when the
machine is shared) and per wall-clock second. MXNet cannot be installed, hence the stand-ins;
bench/RESULTS.md discusses what they mean. For the faithful reference, put torchvision and
OpenCV on the path without touching the environment's torch (a torchvision wheel built for a
CUDA torch still serves its pure-Python transforms):

    pip install --no-deps --target /tmp/benchlib torchvision==0.28.0 opencv-python-headless
    PYTHONPATH=/tmp/benchlib python bench/loader.py
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
    split parts with the magic word). Like MXNet's ``_check_pid`` it reopens the file in a forked
    DataLoader worker (a shared file offset would mix the workers' reads)."""

    def __init__(self, idx_path, rec_path):
        self.idx = {}
        self.keys = []
        with open(idx_path) as f:
            for line in f:
                key, pos = line.strip().split("\t")
                self.idx[int(key)] = int(pos)
                self.keys.append(int(key))
        self.rec_path = rec_path
        self.f = open(rec_path, "rb")
        self.pid = os.getpid()

    def _check_pid(self):
        if self.pid != os.getpid():
            self.f = open(self.rec_path, "rb")
            self.pid = os.getpid()

    def read_idx(self, key):
        self._check_pid()  # MXRecordIO.seek
        self.f.seek(self.idx[key])
        self._check_pid()  # MXRecordIO.read
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


def _load_torchvision_transforms():
    """(torchvision.transforms, version) or (None, None).

    A torchvision wheel built against a CUDA torch cannot load its compiled ops into a CPU torch,
    and its package ``__init__`` then fails; its transforms are pure Python and need none of
    those ops, so they are imported through a bare package module instead.
    """
    import importlib.metadata
    import importlib.util
    import types

    try:
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None, None
    try:
        from torchvision import transforms

        return transforms, version
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torchvision"] = package
    try:
        from torchvision import transforms

        return transforms, version
    except Exception:
        del sys.modules["torchvision"]
        return None, None


def _written_out_transform():
    """torchvision's ToPILImage, RandomHorizontalFlip, ToTensor, Normalize(0.5, 0.5) written out
    (the used code paths only): the fallback when torchvision is not importable."""
    mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)

    def transform(sample):
        pic = Image.fromarray(sample)
        if torch.rand(1) < 0.5:
            pic = pic.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        t = t.view(pic.size[1], pic.size[0], 3).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return t.clone().sub_(mean).div_(std)

    return transform


class MXFaceDatasetReference:
    """insightface ``MXFaceDataset.__getitem__`` and its transform, with MXNet's parts stood in
    for: ``MXNetStyleReader`` + ``mxnet_unpack`` and, for ``mx.image.imdecode(img).asnumpy()``,
    OpenCV's decode + BGR->RGB (or Pillow without OpenCV)."""

    def __init__(self, root):
        self.imgrec = MXNetStyleReader(os.path.join(root, "train.idx"), os.path.join(root, "train.rec"))
        header, _ = mxnet_unpack(self.imgrec.read_idx(0))
        self.imgidx = np.array(range(1, int(header[1][0])))
        transforms, tv_version = _load_torchvision_transforms()
        if transforms is not None:
            self.transform = transforms.Compose([
                transforms.ToPILImage(), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
            ])
            transform_name = f"torchvision {tv_version}"
        else:
            self.transform = _written_out_transform()
            transform_name = "torchvision's code paths written out (torchvision not importable)"
        try:
            import cv2

            cv2.setNumThreads(1)
            self._cv2 = cv2
            decode_name = f"OpenCV {cv2.__version__} imdecode + cvtColor (mx.image.imdecode's decoder)"
        except ImportError:
            self._cv2 = None
            decode_name = "Pillow (OpenCV not importable)"
        self.describe = {"decode": decode_name, "transform": transform_name}

    def _imdecode(self, img: bytes) -> np.ndarray:
        cv2 = self._cv2
        if cv2 is not None:
            return cv2.cvtColor(cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        with Image.open(io.BytesIO(img)) as im:
            return np.asarray(im.convert("RGB"))

    def __len__(self):
        return len(self.imgidx)

    def __getitem__(self, index):
        idx = self.imgidx[index]
        header, img = mxnet_unpack(self.imgrec.read_idx(int(idx)))
        label = header[1]
        if not isinstance(label, numbers.Number):
            label = label[0]
        label = torch.tensor(label, dtype=torch.long)
        sample = self._imdecode(img)
        return self.transform(sample), label


def _rates(per, rows):
    cpu = sorted(r[0] for r in rows)
    wall = sorted(r[1] for r in rows)
    return {"n": per * len(rows), "per_cpu_s_best": round(cpu[-1], 1),
            "per_cpu_s_median": round(cpu[len(cpu) // 2], 1), "per_wall_s_best": round(wall[-1], 1)}


def _compare(fns, n, rounds=5):
    """Rates (calls per CPU second, per wall second) of several functions ``fn(m)`` (m calls each)
    measured in alternating rounds of n // rounds calls; the best round (least disturbed by other
    load on the machine) and the median round of each."""
    per = max(n // rounds, 1)
    rows = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn(per)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            rows[name].append((per / max(cpu, 1e-9), per / max(wall, 1e-9)))
    return {name: _rates(per, r) for name, r in rows.items()}


def _speedup(a, b):
    return {"best": round(a["per_cpu_s_best"] / b["per_cpu_s_best"], 2),
            "median": round(a["per_cpu_s_median"] / b["per_cpu_s_median"], 2)}


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

    r = _compare({"ours": run_ours, "mxnet_standin": run_theirs}, n)
    return {**r, "speedup": _speedup(r["ours"], r["mxnet_standin"])}


def bench_pipeline(root: Path, n: int, seed: int = 0):
    from partial_fc.data.transforms import flip_image, normalize_batch

    ours = FaceRecordDataset(root, transform=train_transform())
    raw = FaceRecordDataset(root)
    reference = MXFaceDatasetReference(root)
    idx = np.random.default_rng(seed).integers(0, len(ours), size=n).tolist()
    for i in idx[:200]:
        ours[i]
        reference[i]

    def run_ours(m):
        for i in idx[:m]:
            ours[i]

    def run_uint8(m):  # the worker's share when the GPU normalises
        for i in idx[:m]:
            image, _ = raw[i]
            flip_image(image, random.random() < 0.5)

    def run_reference(m):
        for i in idx[-m:]:
            reference[i]

    r = _compare({"train_transform": run_ours, "uint8_for_device": run_uint8, "mxface_reference": run_reference}, n)

    batch = torch.stack([flip_image(raw[i][0], False) for i in idx[:128]])
    c0 = time.process_time()
    for _ in range(20):
        normalize_batch(batch)
    batch_us = (time.process_time() - c0) / (20 * 128) * 1e6
    return {
        "reference": reference.describe,
        **r,
        "speedup_train_transform": _speedup(r["train_transform"], r["mxface_reference"]),
        "speedup_uint8_for_device": _speedup(r["uint8_for_device"], r["mxface_reference"]),
        "normalize_batch_cpu_us_per_image": round(batch_us, 1),
    }


def bench_dataloader(root: Path, n: int, workers: int, kind: str, batch: int = 128):
    """Images/s through a torch DataLoader. ``kind``: ``uint8`` (the trainer's path:
    ``AugmentedFaces`` ships uint8 batches, the device normalises), ``float32`` (``AugmentedFaces``
    with ``normalize=True``) or ``mxface_reference`` (``MXFaceDatasetReference``)."""
    from torch.utils.data import DataLoader

    from partial_fc.train.data import AugmentedFaces

    picks = np.random.default_rng(0).integers(0, len(FaceRecordDataset(root)), size=n).tolist()
    if kind == "mxface_reference":
        ds, sampler = MXFaceDatasetReference(root), picks
    else:
        ds = AugmentedFaces(FaceRecordDataset(root), seed=0, normalize=kind == "float32")
        sampler = [(0, i) for i in picks]
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # start-up excluded
    t0 = time.perf_counter()
    seen = 0
    for images, _ in it:
        seen += images.shape[0]
    wall = time.perf_counter() - t0
    return {"workers": workers, "batches": kind, "images": seen,
            "per_wall_s": round(seen / wall, 1), "per_worker_wall_s": round(seen / wall / workers, 1)}


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
        result["dataloader"] = [bench_dataloader(root, args.loader_images, w, kind)
                                for kind in ("uint8", "float32", "mxface_reference") for w in (1, 2)]
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
