"""Set-up that matters on GPU nodes, tested here: intra-op threads, one rank per GPU, TF32,
flattened buffer broadcasts, and how a failed rank leaves its process group."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile

from partial_fc.train import ConfigError
from partial_fc.train.env import DistEnv, configure_float32_math, local_gpu
from partial_fc.train.process_group import broadcast_buffers
from partial_fc.train.run import MAX_DEFAULT_THREADS, default_threads

from tests.helpers.dist_harness import run_workers


@pytest.mark.parametrize("threads,environ,cores,local_ranks,want", [
    (None, {}, 64, 8, 4),               # a GPU node: capped at 4 per rank
    (None, {}, 16, 8, 2),               # the rank's share of the cores it may run on
    (None, {}, 3, 8, 1),                # at least one
    (None, {"OMP_NUM_THREADS": "6"}, 64, 8, None),  # the launcher's choice stands (torch took it)
    (12, {"OMP_NUM_THREADS": "6"}, 64, 8, 12),      # trainer.threads wins over both
])
def test_intra_op_threads_default_to_the_rank_share_of_its_cores_at_most_four(threads, environ, cores,
                                                                               local_ranks, want):
    assert MAX_DEFAULT_THREADS == 4
    assert default_threads(threads, local_ranks, environ=environ, cores=cores) == want


def test_the_default_reads_the_cores_this_process_may_run_on():
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    cores = len(os.sched_getaffinity(0))
    assert default_threads(None, 1, environ={}) == max(1, min(MAX_DEFAULT_THREADS, cores))


def test_more_ranks_on_a_node_than_visible_gpus_is_refused_naming_both():
    env = DistEnv(rank=5, world_size=16, local_rank=5, local_world_size=8, launcher="torchrun")
    assert local_gpu(env, 8) == 5
    with pytest.raises(ConfigError, match=r"trainer\.device=cuda: 8 ranks on this node \(local world size\) "
                                          r"but 4 visible GPU\(s\) \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        local_gpu(env, 4, "0,1,2,3")
    two_on_one = DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2, launcher="torchrun")
    with pytest.raises(ConfigError, match="2 ranks on this node .* but 1 visible GPU"):
        local_gpu(two_on_one, 1)
    # srun --gpus-per-task=1: every task sees its own GPU as GPU 0
    bound = DistEnv(rank=3, world_size=8, local_rank=3, local_world_size=8, launcher="slurm")
    assert local_gpu(bound, 1) == 0


@pytest.fixture
def float32_math():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_tf32_for_float32_matmuls_on_cuda_unless_deterministic(float32_math):
    torch.set_float32_matmul_precision("highest")
    configure_float32_math(torch.device("cpu"), deterministic=False)
    assert torch.get_float32_matmul_precision() == "highest"  # CPU math is left alone
    configure_float32_math(torch.device("cuda", 0), deterministic=False)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    configure_float32_math(torch.device("cuda", 0), deterministic=True)
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32


def _buffers_worker(rank, world_size, layers):
    torch.manual_seed(rank)  # every rank starts from other values
    model = nn.Sequential(*[nn.BatchNorm1d(5) for _ in range(layers)])
    model.register_buffer("scale", torch.randn(3, dtype=torch.float64))
    for bn in model[:layers]:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(10 + rank)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        broadcast_buffers(model, dist.group.WORLD)
    broadcasts = sum(1 for e in prof.events() if e.name == "c10d::broadcast_")
    return {name: b.clone() for name, b in model.named_buffers()}, broadcasts


@pytest.mark.parametrize("layers", [1, 6])
def test_buffers_are_broadcast_from_rank_0_in_one_collective_per_dtype(layers):
    results = run_workers(_buffers_worker, 2, layers)
    (first, broadcasts0), (second, broadcasts1) = results
    assert first.keys() == second.keys() and len(first) == 3 * layers + 1
    for name in first:
        assert torch.equal(first[name], second[name]) and first[name].dtype == second[name].dtype, name
    assert int(second["0.num_batches_tracked"]) == 10  # rank 0's
    assert broadcasts0 == broadcasts1 == 3  # float32, int64, float64


def _write_pack_with_one_broken_image(root, broken_key: int, identities: int = 6, per_identity: int = 8):
    import numpy as np

    from partial_fc.data import IRHeader, RecordIOWriter, pack
    from tests.helpers.data_files import jpeg_bytes

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = identities * per_identity
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:
        writer.write(0, pack(IRHeader(2, [n + 1, n + 1 + identities], 0, 0), b""))
        for key in range(1, n + 1):
            image = jpeg_bytes(rng.integers(0, 255, size=(112, 112, 3), dtype=np.uint8))
            label = (key - 1) // per_identity
            writer.write(key, pack(IRHeader(0, float(label), key, 0), image[:40] if key == broken_key else image))
        for c in range(identities):
            writer.write(n + 1 + c, pack(IRHeader(2, [1 + c * per_identity, 1 + (c + 1) * per_identity], 0, 0), b""))
    (root / "property").write_text(f"{identities},112,112")
    return root


def test_a_rank_that_fails_alone_ends_the_job_with_its_error_not_a_collective_timeout(tmp_path):
    """One rank meets a broken image while its peer waits for it in the classifier's all-gather:
    the failing rank leaves (its process group aborted, not destroyed) and the job ends with its
    error, long before the peer's collective timeout."""
    import os
    import subprocess

    from tests.helpers.e2e import REPO, train_command

    data = _write_pack_with_one_broken_image(tmp_path / "pack", broken_key=17)
    overrides = ["data=rec", f"data.root={data}", "data.batch_size=4", "data.num_workers=0", "data.val_bins=[]",
                 "trainer.max_steps=40", "trainer.val_every=0", "trainer.progress_bar=false",
                 "trainer.collective_timeout_s=300", f"output_root={tmp_path / 'out'}", "run_name=r"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(train_command(2, overrides), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=280)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train.py: error:" in output and "key 17" in output, output[-3000:]
    assert "did not complete" not in output, output[-3000:]  # no CollectiveTimeoutError on the peer


@pytest.mark.parametrize("cores,local_ranks,want", [(64, 8, 8), (16, 8, 2), (4, 8, 1), (2, 1, 2)])
def test_inductor_compiles_with_the_rank_share_of_the_cores(cores, local_ranks, want):
    from partial_fc.train.run import compile_workers

    assert compile_workers(local_ranks, cores=cores) == want
