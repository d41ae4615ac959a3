"""trainer.stop_file: a file's appearance makes every rank end its step, checkpoint and stop,
and the run continues with resume=auto exactly where an uninterrupted run would be."""
import errno
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from partial_fc.train.stop import StopRequest

from tests.helpers.dist_harness import run_workers
from tests.helpers.trainer_fixtures import linear_backbone, make_trainer, parameters_of

MAX_STEPS = 7


def touching_backbone(path, on_call):
    """The fixtures' backbone (same weights, same state-dict keys); its ``on_call``-th forward
    creates ``path``."""
    backbone, calls = linear_backbone(), [0]

    def hook(module, inputs):
        calls[0] += 1
        if calls[0] == on_call:
            Path(path).touch()

    backbone.register_forward_pre_hook(hook)
    return backbone


def _checkpoints(run_dir):
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step_*"))


def test_stop_file_checkpoints_stops_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    whole = make_trainer(tmp_path / "whole", batch_size=8, max_steps=MAX_STEPS)
    summary = whole.fit()
    assert summary["steps"] == MAX_STEPS and not summary["stopped_by_request"]

    run_dir = tmp_path / "stopped"
    stop = run_dir / "STOP"  # the default place
    first = make_trainer(run_dir, batch_size=8, max_steps=MAX_STEPS, stop_poll_s=0,
                         backbone=touching_backbone(stop, on_call=3))
    summary = first.fit()
    assert summary["stopped_by_request"] and summary["steps"] == 3  # seen in step 3, stopped after it
    assert _checkpoints(run_dir) == ["step_00000003"] and not stop.exists()
    assert (run_dir / "STOP.stopped").read_text() == "3\n"  # tells a batch script: unfinished

    second = make_trainer(run_dir, batch_size=8, max_steps=MAX_STEPS, stop_poll_s=0)
    summary = second.fit()
    assert summary["steps"] == MAX_STEPS and not summary["stopped_by_request"]
    got, want = parameters_of(second), parameters_of(whole)
    for x, y in zip(got["backbone"] + [got["classifier"]], want["backbone"] + [want["classifier"]]):
        assert torch.equal(x, y)


def test_polling_interval_is_honoured(tmp_path):
    stop = tmp_path / "request"
    stop.touch()
    trainer = make_trainer(tmp_path / "run", batch_size=8, max_steps=3, stop_file=stop, stop_poll_s=3600)
    trainer.stop._polled_at = float("inf")  # as if it had just looked: the next look is an hour away
    assert trainer.fit()["steps"] == 3 and stop.exists()
    trainer = make_trainer(tmp_path / "run2", batch_size=8, max_steps=3, stop_file=stop, stop_poll_s=3600)
    assert trainer.fit()["steps"] == 1 and not stop.exists()  # its first look comes at once


def _rank_sees_its_own_file_worker(rank, world_size, root):
    # A node-local stop file: only rank 1's file ever appears (on its forward call 2).
    stop = Path(root) / f"stop-rank{rank}"
    backbone = touching_backbone(stop, on_call=2) if rank == 1 else linear_backbone()
    trainer = make_trainer(Path(root) / "run", rank, world_size, batch_size=4, max_steps=MAX_STEPS,
                           group=dist.group.WORLD, backbone=backbone, stop_file=stop, stop_poll_s=0)
    summary = trainer.fit()
    return summary["steps"], summary["stopped_by_request"], stop.exists()


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_rank_seeing_the_file_stops_every_rank_at_the_same_step(tmp_path, world_size):
    results = run_workers(_rank_sees_its_own_file_worker, world_size, str(tmp_path))
    assert results == [(2, True, False)] * world_size
    assert _checkpoints(tmp_path / "run") == ["step_00000002"]


def signalling_backbone(on_call):
    """The fixtures' backbone; its ``on_call``-th forward sends this process SIGUSR1 (a
    scheduler's warning delivered to one rank)."""
    backbone, calls = linear_backbone(), [0]

    def hook(module, inputs):
        calls[0] += 1
        if calls[0] == on_call:
            os.kill(os.getpid(), signal.SIGUSR1)

    backbone.register_forward_pre_hook(hook)
    return backbone


def test_the_stop_signal_requests_a_stop_and_its_handler_is_put_back(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    trainer = make_trainer(tmp_path, batch_size=8, max_steps=MAX_STEPS, backbone=signalling_backbone(2))
    summary = trainer.fit()
    assert summary["stopped_by_request"] and summary["steps"] == 2
    assert _checkpoints(tmp_path) == ["step_00000002"]
    assert signal.getsignal(signal.SIGUSR1) is before


def _signalled_rank_worker(rank, world_size, root):
    backbone = signalling_backbone(3) if rank == world_size - 1 else linear_backbone()
    trainer = make_trainer(Path(root), rank, world_size, batch_size=4, max_steps=MAX_STEPS,
                           group=dist.group.WORLD, backbone=backbone)
    summary = trainer.fit()
    return summary["steps"], summary["stopped_by_request"]


def test_a_signal_to_one_rank_stops_every_rank(tmp_path):
    assert run_workers(_signalled_rank_worker, 2, str(tmp_path)) == [(3, True)] * 2
    assert _checkpoints(tmp_path) == ["step_00000003"]


def test_a_request_on_the_last_step_is_cleared_and_the_run_counts_as_finished(tmp_path):
    stop = tmp_path / "STOP"
    trainer = make_trainer(tmp_path, batch_size=8, max_steps=3, stop_poll_s=0,
                           backbone=touching_backbone(stop, on_call=3))
    summary = trainer.fit()
    assert summary["steps"] == 3 and not summary["stopped_by_request"]
    assert not stop.exists() and not (tmp_path / "STOP.stopped").exists()


def test_a_stop_file_older_than_the_resumed_checkpoint_is_left_over_and_ignored(tmp_path):
    first = make_trainer(tmp_path, batch_size=8, max_steps=MAX_STEPS, stop_at=2)
    first.fit()
    stop = tmp_path / "STOP"
    stop.touch()
    old = (tmp_path / "checkpoints" / "step_00000002").stat().st_mtime - 60
    os.utime(stop, (old, old))  # created before the checkpoint it asked for
    second = make_trainer(tmp_path, batch_size=8, max_steps=MAX_STEPS, stop_poll_s=0)
    assert second.fit()["steps"] == MAX_STEPS and not stop.exists()
    third_dir = tmp_path / "fresh"  # a file newer than anything resumed is a request
    (third_dir).mkdir()
    (third_dir / "STOP").touch()
    third = make_trainer(third_dir, batch_size=8, max_steps=MAX_STEPS, stop_poll_s=0)
    assert third.fit()["steps"] == 1


class _UnreachablePath(type(Path())):
    """A stop-file path whose lookup fails like a stale NFS handle."""

    def exists(self, *args, **kwargs):
        raise OSError(errno.ESTALE, "Stale file handle")


def test_a_failing_stop_file_lookup_does_not_end_the_run(tmp_path, caplog):
    trainer = make_trainer(tmp_path, batch_size=8, max_steps=3, stop_poll_s=0)
    trainer.stop.path = _UnreachablePath(tmp_path / "STOP")
    with caplog.at_level("WARNING"):
        assert trainer.fit()["steps"] == 3
    assert "cannot look for the stop file" in caplog.text and "Stale file handle" in caplog.text


def test_a_signal_before_training_starts_is_kept_for_the_first_step(tmp_path):
    request = StopRequest(tmp_path / "STOP", poll_s=0, signal_name="SIGUSR1")
    before = signal.getsignal(signal.SIGUSR1)
    restore = request.install()  # as run_training does, before data preparation and rendezvous
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
        trainer = make_trainer(tmp_path, batch_size=8, max_steps=MAX_STEPS, stop_request=request)
        assert trainer.fit()["steps"] == 1
        assert signal.getsignal(signal.SIGUSR1) is not before  # fit() leaves the caller's handler
    finally:
        restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def _sleep_long():
    time.sleep(60)


def test_forked_children_keep_the_default_meaning_of_the_signal(tmp_path):
    """Workers forked after install() (DataLoader, packing pools) inherit the handler; there the
    parent's signal must still end them, or Pool.terminate() with stop_signal=SIGTERM would hang."""
    import multiprocessing as mp

    restore = StopRequest(tmp_path / "STOP", poll_s=5.0, signal_name="SIGTERM").install()
    try:
        child = mp.get_context("fork").Process(target=_sleep_long)
        child.start()
        time.sleep(0.5)
        child.terminate()  # SIGTERM
        child.join(timeout=20)
        alive = child.is_alive()
        if alive:
            child.kill()
            child.join()
    finally:
        restore()
    assert not alive and child.exitcode == -signal.SIGTERM


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_forked_children_outlive_the_signal_from_outside_and_still_end_by_the_parents(tmp_path, name):
    """Slurm signals every process of a step: a forked worker ignores the signal from another
    process (here a `kill` the test runs, as slurmstepd would), keeps working, and still ends
    by the same signal from its parent (Process.terminate(), Pool.terminate())."""
    import multiprocessing as mp
    import subprocess

    signum = signal.Signals[name]
    request = StopRequest(tmp_path / "STOP", poll_s=5.0, signal_name=name)
    restore = request.install()
    ctx = mp.get_context("fork")
    try:
        child = ctx.Process(target=_sleep_long)
        child.start()
        time.sleep(1.0)  # the watcher thread is up (it starts in the fork hook, before the target)
        subprocess.run(["kill", f"-{signum.name[3:]}", str(child.pid)], check=True)
        time.sleep(1.0)
        survived = child.is_alive()
        child.terminate() if signum == signal.SIGTERM else os.kill(child.pid, signum)
        child.join(timeout=20)
        ended = not child.is_alive()
        if not ended:
            child.kill()
            child.join()
        with ctx.Pool(2) as pool:  # __exit__ is Pool.terminate()
            assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
    finally:
        restore()
    assert survived and ended and child.exitcode == -signum
    assert not request.signalled  # a child's signal is not the parent's request
