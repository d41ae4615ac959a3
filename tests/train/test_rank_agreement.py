"""Ranks of one job agree or fail fast: the store namespace, the bounded rendezvous, the
config/code/dataset check and the per-node checkpoint directories (gloo, in-process ranks)."""
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from partial_fc.train import checkpoint as ckpt
from partial_fc.train.agreement import (RankDisagreementError, check_ranks_agree, config_record,
                                        describe_differences)
from partial_fc.train.env import DistEnv, InitTimeoutError, init_distributed, job_namespace

from tests.helpers.dist_harness import free_port, run_workers


def test_namespace_comes_from_the_launcher_never_from_paths():
    torchrun = {"TORCHELASTIC_RUN_ID": "job1", "TORCHELASTIC_RESTART_COUNT": "2", "PWD": "/node0/runs"}
    assert job_namespace(torchrun) == "partial_fc/torchrun/job1/attempt_2/job_0"
    assert job_namespace({**torchrun, "PWD": "/node1/elsewhere"}) == job_namespace(torchrun)
    assert job_namespace(torchrun, job_num=3) != job_namespace(torchrun)  # multirun jobs kept apart
    assert job_namespace({**torchrun, "TORCHELASTIC_RESTART_COUNT": "3"}) != job_namespace(torchrun)
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "1"}
    assert job_namespace(slurm) == "partial_fc/slurm/77.0/restart_1/job_0"
    assert job_namespace({}) == "partial_fc/local/job_0"


def test_differences_name_key_ranks_and_values():
    records = [{"head.s": "64", "optim.lr": "0.1"}] * 4 + [{"head.s": "32", "optim.lr": "0.1"}] * 4
    assert describe_differences(records) == ["head.s differs: ranks 0-3 have 64, ranks 4-7 have 32"]
    records = [{"a": "1"}, {"a": "2"}, {"a": "1", "b": "x"}]
    assert describe_differences(records) == ["a differs: ranks 0, 2 have 1, rank 1 has 2",
                                             "b differs: ranks 0-1 have <absent>, rank 2 has x"]
    assert describe_differences([{"a": "1"}] * 3) == []


def test_config_record_leaves_out_per_node_keys_and_compares_numbers_by_value():
    base = {"output_root": "/node0/out", "run_name": "r", "head": {"s": 64.0, "m": [0.5, 1]},
            "data": {"root": "/node0/data", "cache_dir": "/a", "num_workers": 2, "batch_size": 8},
            "trainer": {"device": "cuda", "threads": None, "stop_file": None, "progress_bar": True}}
    other = {"output_root": "/node1/x", "run_name": "q", "head": {"s": 64, "m": [0.5, 1.0]},
             "data": {"root": "/node1/d", "cache_dir": "/b", "num_workers": 8, "batch_size": 8},
             "trainer": {"device": "cpu", "threads": 4, "stop_file": "/s", "progress_bar": False}}
    record = config_record(OmegaConf.create(base))
    assert record == config_record(OmegaConf.create(other))
    assert record == {"head.s": "64", "head.m": "[0.5, 1]", "data.batch_size": "8"}


def _agree_worker(rank, world_size, cases):
    messages = []
    for records in cases:
        try:
            check_ranks_agree(records[rank], rank, world_size)
            messages.append("agreed")
        except RankDisagreementError as err:
            messages.append(str(err))
    return messages


def test_every_rank_fails_with_the_same_differences():
    same = {"head.s": "64", "dataset.records": "192"}
    differ = [same, same, {"head.s": "32", "dataset.records": "192"}]
    results = run_workers(_agree_worker, 3, [[same] * 3, differ], timeout=90)
    for rank, (agreed, message) in enumerate(results):
        assert agreed == "agreed"
        assert message.startswith(f"rank {rank}/3: the ranks of this job do not agree (1 key(s))"), message
        assert "head.s differs: ranks 0-1 have 64, rank 2 has 32" in message


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_alone_fails_within_the_init_timeout_naming_the_rendezvous(rank):
    port = free_port()
    env = DistEnv(rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port, launcher="slurm")
    start = time.monotonic()
    with pytest.raises(InitTimeoutError) as err:
        init_distributed(env, torch.device("cpu"), timeout_s=600, namespace="partial_fc/local/job_0",
                         init_timeout_s=2)
    assert time.monotonic() - start < 30  # 2 s asked; far below the 600-s collective timeout
    message = str(err.value)
    assert message.startswith(f"rendezvous 'partial_fc/local/job_0' at 127.0.0.1:{port}: rank {rank}/2")
    assert "within 2s" in message and "trainer.init_timeout_s" in message
    assert ("waited for the other 1 ranks" if rank == 0 else "could not reach the store of rank 0") in message
    assert not dist.is_initialized()


def _resume(root, rank, world_size):
    try:
        found, main_from_rank0 = ckpt.agree_on_resume(root, "auto", 6, rank, world_size, dist.group.WORLD)
    except ckpt.IncompleteCheckpointError as err:
        return str(err)
    state = ckpt.broadcast_main_state(ckpt.load(found / "trainer.pt") if rank == 0 else None, dist.group.WORLD)
    return found.name, main_from_rank0, int(state["step"])


def _per_node_checkpoint_worker(rank, world_size, base):
    root = Path(base) / f"node{rank}" / "checkpoints"  # no shared filesystem: each rank its own
    writer = ckpt.CheckpointWriter(root, rank, world_size, keep=2, group=dist.group.WORLD)
    main = {"step": torch.tensor(5)} if rank == 0 else {}
    path = writer.save(5, main, {"rows": {"weight": torch.full((3, 2), float(rank))}}, {"num_classes": 6})
    listing = sorted(p.name for p in path.iterdir())
    resumed = _resume(root, rank, world_size)
    dist.barrier()
    if rank == 0:  # a crash after rank 0's node completed step 7, before the other node did
        ckpt.CheckpointWriter(root, 0, 1, keep=3).save(7, main, {"rows": {}}, {"num_classes": 6})
    dist.barrier()
    behind = _resume(root, rank, world_size)
    if rank == 1:
        (path / "shard_00001.pt").unlink()
    dist.barrier()
    missing_shard = _resume(root, rank, world_size)
    if rank == 1:  # the node's disk was wiped
        shutil.rmtree(root)
    dist.barrier()
    lost_node = _resume(root, rank, world_size)
    return listing, resumed, behind, missing_shard, lost_node


def test_nodes_without_a_shared_filesystem_checkpoint_and_resume_together(tmp_path):
    results = run_workers(_per_node_checkpoint_worker, 2, str(tmp_path), timeout=90)
    assert results[0][:2] == (["MANIFEST.json", "shard_00000.pt", "trainer.pt"], ("step_00000005", True, 5))
    assert results[1][:2] == (["MANIFEST.json", "shard_00001.pt"], ("step_00000005", True, 5))
    shard = tmp_path / "node1" / "checkpoints" / "step_00000005" / "shard_00001.pt"
    for rank, (_, _, behind, missing_shard, lost_node) in enumerate(results):
        assert behind == ("step_00000005", True, 5)  # the newest checkpoint every rank has
        # a node that lost its shard fails the resume on every rank, naming the file
        assert missing_shard.startswith(f"rank {rank}/2: cannot resume from step_00000005: 1 file(s) missing"), \
            missing_shard
        assert f"rank 1 needs {shard}" in missing_shard
        # ranks that find different checkpoints never start from scratch
        assert "the ranks find no checkpoint in common" in lost_node, lost_node
        assert "rank 0 finds step_00000007 at the newest" in lost_node
        assert f"rank 1 finds no checkpoint (rank 1 looked in {tmp_path / 'node1' / 'checkpoints'})" in lost_node


_MEET = """
import sys, torch
from partial_fc.train.env import DistEnv, InitTimeoutError, init_distributed
rank, port, namespace = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
try:
    init_distributed(DistEnv(rank=rank, world_size=2, master_port=port), torch.device("cpu"), 600,
                     namespace, init_timeout_s=2)
except InitTimeoutError as err:
    sys.exit(str(err))
"""


def test_ranks_in_different_namespaces_fail_creating_the_group_within_the_init_timeout():
    port = free_port()
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", _MEET, str(rank), str(port), f"ns{rank}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - start < 60  # 2 s asked; far below the 600-s collective timeout
    for rank, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 1, err[-2000:]
        assert (f"process group: rank {rank}/2 waited 2s in rendezvous 'ns{rank}' at 127.0.0.1:{port} "
                f"for the other ranks' gloo addresses") in err, err[-2000:]


@pytest.mark.parametrize("trainer", ["cpu", "gpu"])
def test_init_timeout_is_configured_and_validated(trainer):
    from hydra import compose, initialize_config_dir

    from partial_fc.train.config import ConfigError, validate_config

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer={trainer}"])
        bad = compose(config_name="config", overrides=[f"trainer={trainer}", "trainer.init_timeout_s=0"])
    validate_config(cfg)
    assert 0 < cfg.trainer.init_timeout_s <= cfg.trainer.collective_timeout_s
    with pytest.raises(ConfigError, match=r"^trainer.init_timeout_s must be > 0, got 0$"):
        validate_config(bad)
