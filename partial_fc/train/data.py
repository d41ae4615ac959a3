"""Training data: the dataset on disk (or generated), deterministic augmentation, loaders.
Everything here takes plain arguments; ``builders.prepare_data`` reads them from ``cfg.data``."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.datasets import BadSampleError, LabelError
from ..data.transforms import flip_image, normalize_image

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is mirrored in ``epoch``: a pure function of (seed, epoch, index),
    so a resumed run, any worker count and any world size augment every sample identically."""
    return bool(_mix64(_mix64(_mix64(seed) ^ epoch) ^ index) & 1)


# How many substitutes AugmentedFaces tries for a bad sample before it gives up.
SUBSTITUTE_ATTEMPTS = 16


def substitute_index(seed: int, epoch: int, index: int, attempt: int, size: int) -> int:
    """The sample standing in for bad sample ``index`` of ``epoch`` at try ``attempt``: any other
    index of ``range(size)``, a pure function of its arguments like :func:`flip_decision`."""
    other = _mix64(_mix64(_mix64(_mix64(seed) ^ epoch) ^ index) ^ (attempt + 1)) % (size - 1)
    return other + (other >= index)


class AugmentedFaces(Dataset):
    """``(epoch, index)`` -> (image, int label), mirrored as :func:`flip_decision` says.
    ``base[index]`` yields (uint8 HxWx3 image, label), or None for a bad sample it skipped
    (``on_bad_image=skip``).

    A skipped sample is replaced by another one, :func:`substitute_index` (the next try if that
    one is bad too), so every batch keeps its size (cuDNN's autotuning and compiled graphs see
    one shape), every rank consumes the same sampler positions, and a resumed run draws the same
    substitutes; the substitute is then seen twice in that epoch. Raises BadSampleError when
    ``SUBSTITUTE_ATTEMPTS`` substitutes are all bad (the data set is mostly unreadable).

    By default the image stays a uint8 HxWx3 tensor and the consumer normalises whole batches on
    its device (:func:`partial_fc.data.transforms.normalize_batch`; the Trainer does): workers
    then ship a quarter of the bytes, and a DataLoader's hand-over of a batch through shared
    memory costs more per image than reading and decoding it (bench/RESULTS.md, "Data loader":
    1.8x the images per worker). ``normalize=True`` yields the float32 3xHxW tensor
    ``(x - 127.5) / 128`` instead (bit-identical after normalize_batch).
    """

    def __init__(self, base: Dataset, seed: int, normalize: bool = False):
        self.base = base
        self.seed = int(seed)
        self.normalize = bool(normalize)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        item, used = self.base[index], index
        for attempt in range(SUBSTITUTE_ATTEMPTS if len(self) > 1 else 0):
            if item is not None:
                break
            used = substitute_index(self.seed, epoch, index, attempt, len(self))
            item = self.base[used]
        if item is None:
            raise BadSampleError(
                f"sample {index} is bad (data.on_bad_image=skip) and so were the {SUBSTITUTE_ATTEMPTS} "
                f"samples tried in its place (the warnings name them): the data set is mostly unreadable")
        if used != index:
            log.debug("epoch %d: bad sample %d replaced by sample %d", epoch, index, used)
        image, label = item
        flip = flip_decision(self.seed, epoch, used)
        image = normalize_image(image, flip=flip) if self.normalize else flip_image(image, flip)
        return image, int(label)


class EpochTaggedSampler(Sampler):
    """Yields ``(epoch, index)`` pairs from a DistributedShardSampler."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class BatchStream:
    """Endless (images, labels) batches of exactly ``batch_size`` samples across epochs;
    resumable through the shard sampler.

    One DataLoader serves the whole run: its workers persist from epoch to epoch (no re-fork
    per epoch) and each epoch is one pass of ``iter`` over it, in the sampler's current order
    from its current position. The caller reports what a step consumed with :meth:`advance`
    (``batch_size`` sampler positions per batch), and the sampler's state then says exactly
    where to continue.
    """

    def __init__(self, dataset: AugmentedFaces, sampler, batch_size: int, num_workers: int,
                 pin_memory: bool = False):
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self._loader: Optional[DataLoader] = None
        self._iter: Optional[Iterator] = None

    def _make_loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=EpochTaggedSampler(self.sampler),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def next(self):
        for _ in range(2):
            if self._iter is None:
                if len(self.sampler) < self.batch_size:
                    self.sampler.set_epoch(self.sampler.epoch + 1)
                if len(self.sampler) < self.batch_size:
                    raise ValueError(
                        f"data.batch_size={self.batch_size} is larger than this rank's share of "
                        f"the dataset ({len(self.sampler)} samples per epoch)"
                    )
                if self._loader is None:
                    self._loader = self._make_loader()
                self._iter = iter(self._loader)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.sampler.set_epoch(self.sampler.epoch + 1)
        raise RuntimeError("data loader yielded nothing for a whole epoch")

    def advance(self, local_samples: int) -> None:
        self.sampler.advance(local_samples)

    def close(self) -> None:
        """Stop the workers (they end with the last reference to the loader's iterator)."""
        self._iter = None
        self._loader = None


# ----------------------------------------------------------------------------- datasets


def _generator_fingerprint() -> bytes:
    """The generator's own source, so a changed renderer never reuses a stale cached set."""
    from ..data import synthetic, synthetic_faces

    return b"".join(Path(m.__file__).read_bytes() for m in (synthetic, synthetic_faces))


def synthetic_root(cache_dir: str, params: Dict) -> Path:
    """The cache folder of a synthetic set of generator ``params`` (``data.synthetic``) under
    ``cache_dir`` (``data.cache_dir``): named by a hash of the parameters and of the generator's
    code."""
    params = {k: params[k] for k in sorted(params)}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode() + _generator_fingerprint()).hexdigest()[:10]
    return Path(cache_dir).expanduser().resolve() / f"synthetic-{digest}"


def ensure_synthetic(cache_dir: str, params: Dict, is_local_main: bool, timeout_s: float = 3600.0) -> Path:
    """Generate the synthetic set once (cached by its parameters); other ranks wait for it.

    Generation goes to a temporary folder renamed into place, so a half-written set is never
    used. Runs before any process group exists (ranks coordinate through the file system).
    """
    root = synthetic_root(cache_dir, params)
    done = root / "COMPLETE"
    if done.exists():
        return root
    if is_local_main:
        from ..data import generate_synthetic
        from ..outputs import writing

        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        params = dict(params)
        log.info("generating synthetic identities into %s: %s", root, params)
        with writing(tmp, "the synthetic data set (data.cache_dir)"):
            tmp.mkdir(parents=True)
            summary = generate_synthetic(tmp, **params)
            (tmp / "COMPLETE").write_text(json.dumps(summary, default=str, indent=1))
        try:
            os.replace(tmp, root)
        except OSError:  # another node generated it first (identical content)
            shutil.rmtree(tmp, ignore_errors=True)
        return root
    deadline = time.monotonic() + timeout_s
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {root} to be generated by local rank 0")
        time.sleep(0.5)
    return root


# data.format: how the dataset is stored (synthetic: generated into data.cache_dir as RecordIO).
FORMATS = ("synthetic", "recordio", "folder")


def existing_root(root: str) -> Path:
    """``data.root`` as an absolute path; ConfigError naming the key when it is absent."""
    from .config import ConfigError  # config imports FORMATS from here

    path = Path(str(root)).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"data.root: {path} does not exist")
    return path


TRAIN_IMAGE_SIZE = (112, 112)  # the aligned face crop every backbone here takes


def open_dataset(fmt: str, root: Path, on_bad_image: str, label_check: str, num_classes: Optional[int] = None):
    """The raw (uint8 image, label) dataset in ``root`` (``data.format``); an image that is not
    112x112 is a bad sample (``on_bad_image``: raise | skip), named by its file or key, and a
    RecordIO set whose ``property`` says another size is refused at once; a RecordIO label that
    disagrees with the header's identity ranges does what ``label_check`` (``data.label_check``)
    says. ``num_classes`` (``data.num_classes``, None: counted) is checked against the set; a
    RecordIO set takes it without reading its labels when nothing in the set disagrees."""
    from ..data import FaceRecordDataset, ImageFolderDataset

    if fmt == "folder":
        dataset = ImageFolderDataset(root, on_bad_image=on_bad_image, image_size=TRAIN_IMAGE_SIZE)
    else:
        dataset = FaceRecordDataset(root, on_bad_image=on_bad_image, image_size=TRAIN_IMAGE_SIZE,
                                    check_labels=str(label_check), num_classes=num_classes,
                                    num_classes_key="data.num_classes")
    check_num_classes(num_classes, dataset)
    return dataset


def check_num_classes(wanted: Optional[int], dataset) -> int:
    """The dataset's class count; a disagreeing ``wanted`` (``data.num_classes``, None: any)
    raises LabelError naming the key."""
    found = int(dataset.num_classes)
    if wanted is not None and int(wanted) != found:
        raise LabelError(f"data.num_classes={wanted} but the dataset has {found} classes ({dataset.root})")
    return found


def resolve_val_bins(entries: Optional[Sequence], root: Path) -> List[Path]:
    """Paths of ``data.val_bins`` entries: a path, or a name of ``<root>/<name>.bin``."""
    from .config import ConfigError  # config imports FORMATS from here

    paths = []
    for entry in entries or []:
        candidate = Path(str(entry)).expanduser()
        if not candidate.suffix:
            candidate = candidate.with_suffix(".bin")
        if not candidate.is_absolute():
            candidate = root / candidate
        if not candidate.is_file():
            raise ConfigError(f"data.val_bins: {entry!r} not found (looked for {candidate})")
        paths.append(candidate.resolve())
    return paths
