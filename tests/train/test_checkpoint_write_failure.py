"""A checkpoint that cannot be written (the disk fills, a file size limit) ends every rank with one
message naming the step, the rank, the file and the reason, and the newest complete checkpoint;
that checkpoint and ``latest`` stay as they were and the half-written folder is removed
(apache/mxnet#6050, facebookresearch/metaseq#53: a full disk ended on torch's "unexpected pos")."""
from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from partial_fc.train import checkpoint as ckpt

from tests.helpers.dist_harness import run_workers

REPO = Path(__file__).resolve().parents[2]
SMALL_RUN = ["data.synthetic.num_identities=8", "data.synthetic.images_per_identity=4",
             "data.synthetic.num_heldout_identities=2", "data.synthetic.num_pairs=20", "data.batch_size=4",
             "data.num_workers=0", "trainer.progress_bar=false", "trainer.checkpoint_every=2"]


def _save_small_then_large(rank, world_size, root, failing_rank):
    """Step 2 fits; then ``failing_rank`` may write at most 200 kB per file and step 4 is larger."""
    group = dist.group.WORLD if world_size > 1 else None
    writer = ckpt.CheckpointWriter(Path(root), rank, world_size, keep=3, group=group)
    small = torch.zeros(16)
    writer.save(2, {"step": 2, "w": small} if rank == 0 else {}, {"rows": {"w": small}}, {"num_classes": 4})
    if rank == failing_rank:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    large = torch.zeros(100_000)  # 400 kB
    try:
        writer.save(4, {"step": 4, "w": large} if rank == 0 else {}, {"rows": {"w": large}}, {"num_classes": 4})
    except ckpt.CheckpointWriteError as err:
        return str(err)
    return None


@pytest.mark.parametrize("world_size,failing_rank", [(1, 0), (2, 1), (2, 0)])
def test_a_write_that_fails_on_one_rank_ends_every_rank_naming_the_file_and_the_newest_checkpoint(
        tmp_path, world_size, failing_rank):
    root = tmp_path / "checkpoints"
    messages = run_workers(_save_small_then_large, world_size, str(root), failing_rank, timeout=120,
                           collective_timeout=30)
    expected = (f"checkpoint of step 4 not written: rank {failing_rank}: cannot write the classifier shard "
                f"{root}/step_00000004.tmp/shard_{failing_rank:05d}.pt: File too large; the newest complete checkpoint is "
                f"{root}/step_00000002 (trainer.resume=auto continues from it)")
    assert messages == [expected] * world_size  # every rank, the same words
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert ckpt.find_latest(root) == root / "step_00000002"
    assert ckpt.load(root / "step_00000002" / "trainer.pt")["step"] == 2


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    code = ("import resource, torch, sys; from pathlib import Path; from partial_fc.train import checkpoint as c\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "try:\n"
            "    c.atomic_torch_save({'w': torch.zeros(100_000)}, Path(sys.argv[1]) / 'x.pt', 'the test file')\n"
            "except c.OutputError as err:\n"
            "    print(err, err.errno)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.stdout.strip() == f"cannot write the test file {tmp_path}/x.pt: File too large 27", proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither x.pt nor x.pt.part


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 9 MiB tmpfs (mounting needs root): the disk of the field reports, filling at step 4."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE tests above cover the same path)")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_training_with_one_line_and_keeps_the_last_checkpoint(tmp_path, small_tmpfs):
    run = small_tmpfs / "run"
    env = dict(os.environ, PFC_DATA_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *SMALL_RUN, "trainer.max_steps=20",
                           f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    found = re.fullmatch(rf"train\.py: error: checkpoint of step (\d+) not written: rank 0: cannot write the "
                         rf"(trainer state|classifier shard|backbone) {run}/checkpoints/step_\d+\.tmp/\S+: No space "
                         rf"left on device; the newest complete checkpoint is {run}/checkpoints/(step_\d+) "
                         r"\(trainer\.resume=auto continues from it\)", errors[0])
    assert found, errors[0]
    step, newest = int(found[1]), found[3]
    assert step > 2 and newest == ckpt.step_dir_name(step - 2)
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == newest
    assert not list(checkpoints.glob("*.tmp")) and not list(checkpoints.glob("**/*.part"))
    assert ckpt.load(checkpoints / newest / "trainer.pt")["step"] == step - 2
