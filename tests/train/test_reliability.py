"""What clusters do to jobs: hung peers, world-size changes, config errors, unsafe inputs."""
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from partial_fc import shard_range
from partial_fc.train import checkpoint as ckpt
from partial_fc.train.process_group import CollectiveTimeoutError

from tests.helpers.dist_harness import free_port, run_workers
from tests.helpers.trainer_fixtures import make_trainer, parameters_of

REPO = Path(__file__).resolve().parents[2]


def _hang_worker(rank, world_size, run_dir):
    trainer = make_trainer(run_dir, rank, world_size, batch_size=4, group=dist.group.WORLD,
                           collective_timeout_s=3.0)
    if rank == 1:
        time.sleep(14)  # a hung peer: never joins the step's collectives
        return "slept"
    try:
        trainer.fit()
    except CollectiveTimeoutError as err:
        return str(err)
    return "no error"


def test_hung_peer_ends_the_job_with_a_message_naming_operation_and_rank(tmp_path):
    start = time.monotonic()
    results = run_workers(_hang_worker, 2, str(tmp_path), collective_timeout=3.0, timeout=90)
    message = results[0]
    # the first collective of fit: the ranks compare the checkpoints they find
    assert message.startswith("rank 0/2 at step 0: a collective in 'resume (ranks compare"), message
    assert "within 3s" in message and "trainer.collective_timeout_s" in message
    assert "1" in message.split("barrier probe:")[-1]  # gloo names the rank that did not answer
    assert time.monotonic() - start < 80


def _save_worker(rank, world_size, run_dir):
    trainer = make_trainer(run_dir, rank, world_size, batch_size=4, group=dist.group.WORLD)
    for _ in range(2):
        trainer.train_step()  # momentum buffers become non-zero
    trainer.save_checkpoint()
    opt_state = trainer.classifier_optimizer.state_dict()["state"]
    return {**parameters_of(trainer), "momentum": opt_state[0]["momentum_buffer"].clone(),
            "position": trainer.batches.sampler.position}


def _load_worker(rank, world_size, run_dir):
    group = dist.group.WORLD if world_size > 1 else None
    trainer = make_trainer(run_dir, rank, world_size, batch_size=4, group=group)
    trainer.load_checkpoint(Path(run_dir) / "checkpoints" / "step_00000002")
    backbone = [p.detach().clone() for p in trainer.backbone.parameters()]
    record = trainer.train_step()  # and training continues
    return {"classifier": trainer.classifier.weight.detach().clone(), "backbone": backbone,
            "loss": float(record["loss"]), "step": trainer.step}


@pytest.mark.parametrize("old,new", [(3, 1), (1, 4)])  # 2 -> 3: test_train_resume_e2e
def test_resume_on_another_world_size_keeps_rows_momentum_and_backbone(tmp_path, old, new):
    saved = run_workers(_save_worker, old, str(tmp_path)) if old > 1 else [_save_worker(0, 1, str(tmp_path))]
    rows = torch.cat([r["classifier"] for r in saved])
    momentum = torch.cat([r["momentum"] for r in saved])
    # What each new rank holds right after loading, before its first step:
    for rank in range(new):
        state, _ = ckpt.load_shard_rows(tmp_path / "checkpoints" / "step_00000002", rows.shape[0], new, rank)
        start, count = shard_range(rows.shape[0], new, rank)
        assert torch.equal(state["rows"]["weight"], rows[start:start + count])
        assert torch.equal(state["rows"]["optimizer_state"][0]["momentum_buffer"], momentum[start:start + count])
    loaded = run_workers(_load_worker, new, str(tmp_path)) if new > 1 else [_load_worker(0, 1, str(tmp_path))]
    assert all(r["step"] == 3 for r in loaded)
    assert len({r["loss"] for r in loaded}) == 1  # one global loss, on every rank
    assert torch.cat([r["classifier"] for r in loaded]).shape == rows.shape
    for r in loaded:  # the backbone as saved
        for got, want in zip(r["backbone"], saved[0]["backbone"]):
            assert torch.equal(got, want)


def _run_launch(overrides, extra_env=None, timeout=60):
    env = dict(os.environ, **(extra_env or {}))
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,key", [
    ("head.sample_rate=1.5", "head.sample_rate"),
    ("data.batch_size=0", "data.batch_size"),
    ("model=r1000", "model"),
    ("trainer.stop_poll_s=-1", "trainer.stop_poll_s"),
    ("trainer.stop_signal=SIGKILL", "trainer.stop_signal"),
])
def test_config_errors_fail_before_any_process_group(tmp_path, override, key):
    # RANK/WORLD_SIZE say "rank 0 of 2" with nobody else coming: creating the process group would
    # block until the timeout; a config error must end the process at once instead.
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PFC_DATA_CACHE": str(tmp_path)}
    start = time.monotonic()
    proc = _run_launch([override, f"output_root={tmp_path}"], env)
    assert proc.returncode != 0
    assert key in proc.stderr + proc.stdout
    assert time.monotonic() - start < 45
    assert not (tmp_path / "synthetic").exists()


def test_num_classes_disagreeing_with_the_data_fails_before_any_process_group(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PFC_DATA_CACHE": str(tmp_path)}
    proc = _run_launch(["data.num_classes=999", "data.synthetic.num_identities=8",
                        "data.synthetic.images_per_identity=2", "data.synthetic.num_heldout_identities=2",
                        "data.synthetic.num_pairs=4", f"output_root={tmp_path}"], env, timeout=120)
    assert proc.returncode != 0
    assert "data.num_classes=999 but the dataset has 8 classes" in proc.stderr + proc.stdout


def _unsafe_calls(tree):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            yield func.id
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
                (func.value.id, func.attr) in (("os", "system"), ("os", "popen")):
            yield f"os.{func.attr}"
        for kw in node.keywords:
            if kw.arg == "shell" and isinstance(kw.value, ast.Constant) and kw.value.value:
                yield "shell=True"


def test_no_shell_commands_are_built_from_strings():
    offenders = []
    for path in list((REPO / "partial_fc").rglob("*.py")) + list((REPO / "launch").rglob("*.py")):
        for what in _unsafe_calls(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(REPO)}: {what}")
    assert not offenders, offenders
