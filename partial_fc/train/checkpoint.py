"""Atomic, world-size-independent checkpoints of a sharded training run.

Layout of ``<run dir>/checkpoints``::

    step_00001000/
        trainer.pt        rank 0: backbone, its optimizer, scaler, step, data position, ...
        backbone.pt       rank 0: the backbone alone (partial_fc.models.load_backbone format)
        shard_00000.pt    rank r: its classifier rows, their optimizer state, its RNG states
        MANIFEST.json     written last: step, world size, class ranges (marks the dir complete)
    latest                name of the newest complete checkpoint

A checkpoint is written to ``step_X.tmp`` and renamed when every rank's file is on disk, and
``latest`` is replaced after that, so a crash at any point leaves the previous checkpoint
loadable and ``latest`` pointing at it. Everything is loaded with ``weights_only=True``.

Resuming on another world size re-shards the classifier: each new rank reads the old shards that
overlap its class range and slices every per-row tensor (weights, momentum, Adam moments).

:class:`Checkpointer` is the one owner of what a checkpoint holds: the trainer hands it objects
with ``state_dict`` / ``load_state_dict`` (as torchtitan's ``CheckpointManager`` takes them) and
it decides what goes into which file, how it re-shards and how it loads.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..classifier.sharding import shard_range
from . import rng
from .agreement import rank_spans
from ..outputs import OutputError, writing

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path, what: str = "checkpoint file") -> None:
    """torch.save to a temporary name, fsync, rename into place; a write that fails (a full
    disk) removes the temporary file and raises OutputError naming ``path`` and the reason."""
    tmp = path.with_name(path.name + ".part")
    with writing(path, what), _removed_on_failure(tmp):
        with open(tmp, "wb") as f:  # a file object: torch.save then chains the OSError of a write
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: Path, text: str, what: str = "checkpoint file") -> None:
    """Write ``text`` to a temporary name, fsync, rename into place (OutputError as above)."""
    tmp = path.with_name(path.name + ".part")
    with writing(path, what), _removed_on_failure(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _removed_on_failure(path: Path):
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit this run; the message names the
    file and what was expected against what was found."""


class CheckpointWriteError(OutputError):
    """A checkpoint could not be written (raised on every rank): the message names the step, the
    rank and file that failed and why, and the newest complete checkpoint, which is intact."""


def read_manifest(path: Path) -> Dict:
    """``MANIFEST.json`` of checkpoint ``path``; CheckpointError naming it when unreadable."""
    manifest = path / MANIFEST
    try:
        value = json.loads(manifest.read_text())
        if not isinstance(value, dict) or not {"num_classes", "world_size"} <= set(value):
            raise ValueError("expected an object with num_classes and world_size")
        return value
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest}: not a readable checkpoint manifest ({err})") from None


def check_manifest(path: Path, num_classes: int, expected: Dict) -> Dict:
    """The manifest of checkpoint ``path``, checked against this run before anything is loaded:
    its ``num_classes`` and every entry of ``expected`` (model, head) must be this run's, else
    CheckpointError naming the file, the key and both values."""
    manifest = read_manifest(path)
    wanted = {"num_classes": num_classes, **expected}
    differ = [f"{key}={manifest[key]} (this run: {value})" for key, value in wanted.items()
              if key in manifest and str(manifest[key]) != str(value)]
    if differ:
        raise CheckpointError(
            f"{path / MANIFEST}: the checkpoint was written with {', '.join(differ)}; this run folder holds "
            "another run: name a new one (run_name=... or hydra.run.dir=...) or start afresh "
            "(trainer.resume=none)")
    return manifest


def load(path: Path) -> Any:
    """``torch.load`` (CPU, ``weights_only``) of one checkpoint file; a missing or unreadable
    file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*")) if path.parent.is_dir() else []
        raise CheckpointError(f"{path}: missing from the checkpoint (the folder holds: "
                              f"{', '.join(present) or 'nothing'})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, unsafe pickle: all mean the same
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # weights_only's refusal says what it found on a later line ("Unsupported global: ...")
        found = next((line for line in lines if "Unsupported global" in line), None)
        if found:
            what = f"refused by weights_only, {found[:300]}"
        else:  # torch's first line advises weights_only=False, which we never do: say what it is
            from ..models.serialization import describe_file

            what = f"found {describe_file(path)}"
        raise CheckpointError(f"{path}: not a readable checkpoint file ({path.stat().st_size} bytes): "
                              f"{what}") from None


def load_into(module: torch.nn.Module, state: Dict, path: Path, what: str) -> None:
    """``module.load_state_dict(state)``; a mismatch raises CheckpointError naming the file and
    listing the missing, unexpected and differently shaped entries (expected vs found)."""
    mine = module.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [f"{k}: expected {tuple(mine[k].shape)}, found {tuple(state[k].shape)}" for k in mine
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape(s) differ, e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} entries missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected entries, e.g. {unexpected[0]}")
        raise CheckpointError(f"{path}: the {what} does not fit this run's model ({'; '.join(parts)}); "
                              "was it written with other model.* settings?")
    module.load_state_dict(state)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file() and not path.name.endswith(".tmp")


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoint dirs under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names if complete, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir() and is_complete(candidate):
            return candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_resume(root: Path, resume: str) -> Optional[Path]:
    """``auto``: newest complete checkpoint or None; ``none``: None; else that checkpoint dir."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume).expanduser().resolve()
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not path.is_dir() or not is_complete(path):
        raise FileNotFoundError(f"trainer.resume={resume!r}: {path} is not a complete checkpoint ({MANIFEST} missing)")
    return path


class IncompleteCheckpointError(FileNotFoundError):
    """The ranks cannot resume together: they found different checkpoints (or some none), or a
    file a rank must read is missing; the message names the ranks, checkpoints and files."""


def needed_files(path: Path, num_classes: int, world_size: int, rank: int) -> List[str]:
    """The files of checkpoint ``path`` that ``rank`` of ``world_size`` reads on resume: its
    classifier shard(s) (those of the old ranks whose rows overlap its class range, when the
    world size changed), and on rank 0 the trainer state. Other ranks receive that from rank 0."""
    old_world = int(read_manifest(path)["world_size"])
    names = ["trainer.pt"] if rank == 0 else []
    if old_world == world_size:
        return names + [f"shard_{rank:05d}.pt"]
    start, count = shard_range(num_classes, world_size, rank)
    olds = {0}  # shared entries (optimizer groups, buffers) come from the first old shard
    for old_rank in range(old_world):
        old_start, old_count = shard_range(num_classes, old_world, old_rank)
        if max(start, old_start) < min(start + count, old_start + old_count):
            olds.add(old_rank)
    return names + [f"shard_{r:05d}.pt" for r in sorted(olds)]


def _gather(obj, world_size: int, group) -> List:
    if group is None or world_size <= 1:
        return [obj]
    out: List = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def agree_on_resume(root: Path, resume: str, num_classes: int, rank: int, world_size: int,
                    group=None) -> Tuple[Optional[Path], bool]:
    """Collective: the checkpoint every rank resumes from (None: all start afresh), and whether
    ranks other than 0 lack ``trainer.pt`` (then rank 0 sends its content, see ``broadcast_main_state``).

    Each rank looks in its own ``root`` (nodes may not share a filesystem). With ``resume=auto``
    the newest checkpoint complete on every rank is taken (a crash between two nodes completing
    their copies leaves one node a step ahead; that is logged). Raises
    :class:`IncompleteCheckpointError` on every rank when some ranks find checkpoints and others
    none in common, or a file a rank must read is missing: a run never restarts from scratch silently.
    """
    if resume == "auto":
        names = [p.name for p in complete_checkpoints(root)]
        where = str(root)
    else:
        try:
            path = resolve_resume(root, resume)
            names, where, error = ([path.name] if path is not None else []), str(path or root), None
        except FileNotFoundError as err:  # said on every rank, not only where it happened
            names, where, error = [], str(root), str(err)
    seen = _gather({"names": names, "where": where, "error": error if resume != "auto" else None},
                   world_size, group)
    errors = [(r, rep["error"]) for r, rep in enumerate(seen) if rep["error"]]
    if errors:
        raise IncompleteCheckpointError(f"rank {rank}/{world_size}: " + "; ".join(f"rank {r}: {e}" for r, e in errors))
    common = set.intersection(*(set(r["names"]) for r in seen))
    if not common and any(r["names"] for r in seen):
        by_newest: Dict[Optional[str], List[int]] = {}
        for r, rep in enumerate(seen):
            by_newest.setdefault(rep["names"][-1] if rep["names"] else None, []).append(r)

        def says(name, ranks):
            verb_s = "s" if len(ranks) == 1 else ""
            what = f"find{verb_s} {name} at the newest" if name else f"find{verb_s} no checkpoint"
            return f"{rank_spans(ranks)} {what} (rank {ranks[0]} looked in {seen[ranks[0]]['where']})"

        raise IncompleteCheckpointError(
            f"rank {rank}/{world_size}: the ranks find no checkpoint in common (trainer.resume={resume}); "
            "each node's run directory must hold the checkpoints its ranks wrote:\n  "
            + "\n  ".join(says(name, ranks) for name, ranks in by_newest.items()))
    if not common:
        return None, False
    chosen = max(common)
    path = root / chosen if resume == "auto" else Path(where)
    if resume == "auto" and names[-1] != chosen:
        log.warning("resuming from %s, the newest checkpoint every rank has; this rank also has %s",
                    chosen, ", ".join(n for n in names if n > chosen))
    missing = [str(path / n) for n in needed_files(path, num_classes, world_size, rank)
               if not (path / n).is_file()]
    reports = _gather({"missing": missing, "has_main": (path / "trainer.pt").is_file()}, world_size, group)
    missing_all = [(r, f) for r, rep in enumerate(reports) for f in rep["missing"]]
    if missing_all:
        raise IncompleteCheckpointError(
            f"rank {rank}/{world_size}: cannot resume from {chosen}: {len(missing_all)} file(s) missing "
            f"(a node's run directory lacks what its ranks wrote, or the world size changed and the "
            f"shards lie on other nodes):\n  " + "\n  ".join(f"rank {r} needs {f}" for r, f in missing_all))
    return path, not all(rep["has_main"] for rep in reports)


def broadcast_main_state(state: Optional[Dict], group) -> Dict:
    """Rank 0's ``trainer.pt`` content (``state``, None elsewhere) on every rank of ``group``."""
    box = [state]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _barrier(group) -> None:
    if group is not None:
        dist.barrier(group=group)


class CheckpointWriter:
    """Writes checkpoints collectively from every rank of ``group``."""

    def __init__(self, root: Path, rank: int, world_size: int, keep: int, group=None):
        self.root = Path(root)
        self.rank, self.world_size, self.keep, self.group = rank, world_size, keep, group

    def save(self, step: int, main_state: Dict, shard_state: Dict, manifest: Dict,
             backbone_writer=None) -> Path:
        """Write one checkpoint; every rank calls this with its own ``shard_state``.

        Nodes need not share a filesystem: each rank writes its shard into the directory it sees,
        and the lowest rank that sees a directory completes it (``MANIFEST.json``, rename,
        ``latest``, pruning). On a shared filesystem that is rank 0 alone; with per-node run
        directories each node's copy holds its ranks' shards and rank 0's also the trainer state.
        A write that fails on any rank (a full disk) raises CheckpointWriteError on every rank
        after the half-written folder is removed; the previous checkpoint and ``latest`` stay.
        """
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        self._agree(step, tmp, self._attempt(self._prepare, tmp) if self.rank == 0 else None)
        self._agree(step, tmp, self._attempt(self._write_files, tmp, main_state, shard_state, backbone_writer))
        seen = sorted(int(p.name[6:11]) for p in tmp.glob("shard_*.pt"))
        completes = bool(seen) and seen[0] == self.rank
        _barrier(self.group)  # every rank has looked before any directory is renamed
        error = self._attempt(self._complete, tmp, final, {**manifest, "step": step,
                                                          "world_size": self.world_size}) if completes else None
        self._agree(step, tmp, error)
        return final

    def _prepare(self, tmp: Path) -> None:
        with writing(tmp, "the checkpoint folder"):
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()

    def _write_files(self, tmp: Path, main_state: Dict, shard_state: Dict, backbone_writer) -> None:
        with writing(tmp, "the checkpoint folder"):
            tmp.mkdir(parents=True, exist_ok=True)  # a node whose disk rank 0 does not write
        atomic_torch_save(shard_state, tmp / f"shard_{self.rank:05d}.pt", "the classifier shard")
        if self.rank == 0:
            atomic_torch_save(main_state, tmp / "trainer.pt", "the trainer state")
            if backbone_writer is not None:
                with writing(tmp / "backbone.pt", "the backbone"):
                    backbone_writer(tmp / "backbone.pt")

    def _complete(self, tmp: Path, final: Path, manifest: Dict) -> None:
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1), "the checkpoint manifest")
        _fsync_dir(tmp)
        with writing(final, "the checkpoint folder"):
            if final.exists():  # the same step saved again (e.g. a re-run after a crash)
                shutil.rmtree(final)
            os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n", "the latest-checkpoint pointer")
        self._prune()

    @staticmethod
    def _attempt(write: Callable, *args) -> Optional[str]:
        """Run ``write``; the message of the OutputError it raises, or None."""
        try:
            write(*args)
        except OutputError as err:
            return str(err)
        return None

    def _agree(self, step: int, tmp: Path, error: Optional[str]) -> None:
        """Collective (in place of a barrier): every rank learns whether a write failed on any;
        then the half-written ``tmp`` is removed and every rank raises CheckpointWriteError."""
        failed = [(r, e) for r, e in enumerate(_gather(error, self.world_size, self.group)) if e]
        if not failed:
            return
        shutil.rmtree(tmp, ignore_errors=True)  # the space it took, back (a full disk)
        done = complete_checkpoints(self.root)
        newest = (f"the newest complete checkpoint is {done[-1]} (trainer.resume=auto continues from it)"
                  if done else "no complete checkpoint exists yet")
        rank, message = failed[0]
        raise CheckpointWriteError(f"checkpoint of step {step} not written: rank {rank}: {message}; {newest}")

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def _slice_rows(value: Any, old_count: int, lo: int, hi: int) -> Any:
    """Rows [lo, hi) of every tensor in ``value`` whose first dim is the shard's row count."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == old_count:
            return value[lo:hi]
        return value
    if isinstance(value, dict):
        return {k: _slice_rows(v, old_count, lo, hi) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_rows(v, old_count, lo, hi) for v in value)
    return value


def _concat_rows(pieces: List[Any]) -> Any:
    """Concatenate row slices along dim 0; 0-dim tensors and plain values come from the first."""
    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(pieces, dim=0) if first.dim() >= 1 else first
    if isinstance(first, dict):
        return {k: _concat_rows([p[k] for p in pieces]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_concat_rows([p[i] for p in pieces]) for i in range(len(first)))
    return first


def load_shard_rows(path: Path, num_classes: int, world_size: int, rank: int) -> Tuple[Dict, bool]:
    """This rank's classifier state from a checkpoint written by any world size.

    Returns ``(state, same_layout)``: ``state["rows"]`` holds the per-row structures (weight,
    optimizer state; every tensor of dim >= 1 in it is indexed by class row, 0-dim tensors and
    other values are shared) re-sliced to this rank's classes, and the other entries (optimizer
    hyper-parameters, buffers) come from the first old shard; ``same_layout`` is True when the
    checkpoint had this very world size (then RNG states and other per-rank entries are this
    rank's own).
    """
    manifest = read_manifest(path)
    old_world = int(manifest["world_size"])
    if int(manifest["num_classes"]) != num_classes:
        raise CheckpointError(
            f"{path / MANIFEST}: checkpoint has num_classes={manifest['num_classes']}, this run "
            f"{num_classes} (data.num_classes / the dataset)"
        )
    start, count = shard_range(num_classes, world_size, rank)
    if old_world == world_size:
        return load(path / f"shard_{rank:05d}.pt"), True
    pieces = []
    for old_rank in range(old_world):
        old_start, old_count = shard_range(num_classes, old_world, old_rank)
        lo, hi = max(start, old_start), min(start + count, old_start + old_count)
        if lo >= hi:
            continue
        shard = load(path / f"shard_{old_rank:05d}.pt")
        pieces.append(_slice_rows(shard["rows"], old_count, lo - old_start, hi - old_start))
    first = load(path / "shard_00000.pt")
    shared = {k: v for k, v in first.items() if k not in ("rows", "rng", "rank")}
    if not pieces:  # this rank owns no classes
        old_count = shard_range(num_classes, old_world, 0)[1]
        return {**shared, "rows": _slice_rows(first["rows"], old_count, 0, 0)}, False
    return {**shared, "rows": _concat_rows(pieces)}, False


def classifier_shard_state(classifier: torch.nn.Module, optimizer) -> Dict:
    """What a rank saves of its classifier shard (``shard_XXXXX.pt`` less ``rng`` and ``rank``):
    ``rows`` (``weight``, the C_r x D rows; ``optimizer_state``, their per-row optimizer state),
    ``optimizer_groups``, ``classifier_buffers`` (the head's excluded) and ``head_buffers``."""
    opt_state = optimizer.state_dict()
    return {
        "rows": {"weight": classifier.weight.detach().cpu(), "optimizer_state": opt_state["state"]},
        "optimizer_groups": opt_state["param_groups"],
        "classifier_buffers": {k: v.cpu() for k, v in classifier.named_buffers() if not k.startswith("head.")},
        "head_buffers": {k: v.cpu() for k, v in classifier.head.named_buffers()},
    }


def load_classifier_shard(shard: Dict, classifier: torch.nn.Module, optimizer, path: Path, rank: int) -> None:
    """Copy a :func:`load_shard_rows` result into ``classifier`` and its ``optimizer`` (in
    place); rows of another embedding size raise CheckpointError naming ``path``."""
    rows = shard["rows"]["weight"]
    if rows.shape != classifier.weight.shape:
        raise CheckpointError(
            f"{path}: classifier rows of rank {rank} are {tuple(rows.shape)} (classes x "
            f"embedding), this run has {tuple(classifier.weight.shape)}; model.embedding_size "
            "must match the checkpoint's")
    with torch.no_grad():
        classifier.weight.copy_(rows)
    groups = optimizer.state_dict()["param_groups"]
    for mine, saved in zip(groups, shard["optimizer_groups"]):
        mine.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.load_state_dict({"state": shard["rows"]["optimizer_state"], "param_groups": groups})
    for name, value in shard["classifier_buffers"].items():
        classifier.get_buffer(name).copy_(value)
    for name, value in shard["head_buffers"].items():
        classifier.head.get_buffer(name).copy_(value)


class Checkpointer:
    """Saves and restores a sharded training run (the layout in this module's docstring).

    Args:
        root: the ``checkpoints`` folder this rank sees.
        states: name -> object with ``state_dict`` / ``load_state_dict`` saved by rank 0 into
            ``trainer.pt`` under that name (an ``nn.Module`` is loaded key by key, mismatches
            named); the same objects on every rank.
        progress: an object whose ``state_dict`` entries (``step`` among them) are saved at the
            top level of ``trainer.pt``.
        classifier / classifier_optimizer: this rank's :class:`partial_fc.PartialFC` shard and its
            row-sparse optimizer (saved by every rank into ``shard_XXXXX.pt``, re-sharded on load).
        seed: ``trainer.seed``; seeds the RNGs of a rank whose checkpoint had another world size.
        manifest: extra entries of ``MANIFEST.json`` (besides num_classes, step, world_size).
        save_backbone: writes the bare backbone to a path (``backbone.pt``); rank 0 calls it.
    """

    def __init__(self, root: Path, states: Dict[str, Any], progress: Any, classifier: torch.nn.Module,
                 classifier_optimizer, rank: int = 0, world_size: int = 1, keep: int = 3, group=None,
                 seed: int = 0, manifest: Optional[Dict] = None,
                 save_backbone: Optional[Callable[[Path], None]] = None):
        self.writer = CheckpointWriter(root, rank, world_size, keep, group)
        self.states, self.progress = states, progress
        self.classifier, self.classifier_optimizer = classifier, classifier_optimizer
        self.rank, self.world_size, self.group, self.seed = rank, world_size, group, seed
        self.manifest = dict(manifest or {})
        self.save_backbone = save_backbone

    @property
    def root(self) -> Path:
        return self.writer.root

    def main_state(self) -> Dict:
        """What rank 0 saves into ``trainer.pt``."""
        return {**self.progress.state_dict(), **{k: v.state_dict() for k, v in self.states.items()}}

    def shard_state(self) -> Dict:
        """What every rank saves: its classifier rows, their optimizer state, its RNG."""
        return {**classifier_shard_state(self.classifier, self.classifier_optimizer),
                "rng": rng.rng_state(), "rank": self.rank}

    def resume_point(self, resume: str) -> Tuple[Optional[Path], bool]:
        """Collective: see :func:`agree_on_resume` (``trainer.resume``: auto | none | a path)."""
        return agree_on_resume(self.root, resume, self.classifier.num_classes, self.rank,
                               self.world_size, self.group)

    def save(self, step: int) -> Path:
        """Collective: write the checkpoint of ``step``; returns its folder."""
        main = self.rank == 0
        manifest = {"num_classes": self.classifier.num_classes, **self.manifest}
        return self.writer.save(step, self.main_state() if main else {}, self.shard_state(), manifest,
                                self.save_backbone if main else None)

    def load(self, path: Path, main_from_rank0: bool = False) -> None:
        """Restore every object from checkpoint ``path``; ``main_from_rank0``: ``trainer.pt``
        comes from rank 0 (nodes that do not share a filesystem have only their own shards).
        The manifest is checked first (:func:`check_manifest`): a run folder of another run is
        named as such, before any state (the sampler's data set length) disagrees."""
        check_manifest(path, self.classifier.num_classes, self.manifest)
        main_path = path / "trainer.pt"
        if main_from_rank0:
            main = broadcast_main_state(load(main_path) if self.rank == 0 else None, self.group)
        else:
            main = load(main_path)
        for name, obj in self.states.items():
            if name not in main:
                raise CheckpointError(f"{main_path}: holds no {name!r} (it has: {', '.join(sorted(main))})")
            if isinstance(obj, torch.nn.Module):
                load_into(obj, main[name], main_path, name)
                continue
            try:
                obj.load_state_dict(main[name])
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{main_path}: the {name} state does not fit this run ({err}); was the "
                                      "checkpoint written for another data set or config?") from None
        self.progress.load_state_dict({k: v for k, v in main.items() if k not in self.states})
        step = int(main["step"])
        shard, same_layout = load_shard_rows(path, self.classifier.num_classes, self.world_size, self.rank)
        load_classifier_shard(shard, self.classifier, self.classifier_optimizer, path, self.rank)
        if same_layout:
            rng.set_rng_state(shard["rng"])
        else:  # new ranks have no RNG history: derive it from (seed, rank, step)
            rng.seed_everything(rng.resume_seed(self.seed, self.rank, step))
        log.info("resumed from %s at step %d (%s layout)", path, step,
                 "same" if same_layout else f"re-sharded to {self.world_size} ranks")
