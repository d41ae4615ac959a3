import pytest

from partial_fc.train.env import detect_env, first_slurm_host
from partial_fc.train.schedule import lr_factor


def test_torchrun_variables():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node7", 1234, "torchrun")


def test_slurm_without_torchrun():
    env = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                      "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)",
                      "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu017" and env.launcher == "slurm"
    assert env.master_port == 20000 + 4242


def test_plain_process():
    env = detect_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "none")
    # a single Slurm task is a plain process too
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


@pytest.mark.parametrize("nodes,first", [("a1", "a1"), ("gpu[001-004,007]", "gpu001"),
                                         ("n[3,5],m1", "n3"), ("host-a,host-b", "host-a")])
def test_first_slurm_host(nodes, first):
    assert first_slurm_host(nodes) == first


def test_warmup_then_polynomial_decay():
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(55, 100, warmup_steps=10, power=2.0) == pytest.approx(0.25)
    assert lr_factor(100, 100, warmup_steps=10) == pytest.approx(0.0)
    assert lr_factor(100, 100, min_factor=0.1) == pytest.approx(0.1)
