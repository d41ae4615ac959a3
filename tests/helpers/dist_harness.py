"""Run a function on N gloo ranks in fresh processes, with a hard timeout."""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, out_dir, args, collective_timeout):
    torch.set_num_threads(1)
    error_file = Path(out_dir) / f"rank{rank}.err"
    finished = False
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # Rank 0 hosts the store: without this it could tear it down while another rank is still
        # finishing ("terminate called without an active exception", about 1 run in 6). A group
        # that a test broke on purpose (a collective timed out) cannot meet: the result stands.
        try:
            dist.barrier()
        except RuntimeError:
            pass
        finished = True
    except BaseException:
        error_file.write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if finished:
        # The result is saved and the group is gone: leave without the interpreter's teardown,
        # where C++ static destructors of gloo/c10d threads can still abort the process
        # ("terminate called without an active exception", SIGABRT, seen about 1 run in 50).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_workers(fn, world_size: int, *args, timeout: float = 180.0, collective_timeout=60.0):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    ``fn`` must be importable (module level). A worker that fails raises here with its traceback;
    ranks still running after ``timeout`` seconds are killed and a TimeoutError raised, so a hung
    collective fails the test instead of the CI job.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_entry,
                args=(fn, rank, world_size, port, out_dir, args, collective_timeout),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = {
            r: (Path(out_dir) / f"rank{r}.err").read_text()
            for r in range(world_size)
            if (Path(out_dir) / f"rank{r}.err").exists()
        }
        if errors:
            rank, text = sorted(errors.items())[0]
            raise RuntimeError(f"rank {rank} of {world_size} failed:\n{text}")
        if hung:
            raise TimeoutError(f"ranks {hung} of {world_size} still running after {timeout}s")
        # SIGABRT after the rank saved its result is gloo's teardown ("terminate called without
        # an active exception"), not the function under test (_entry normally leaves by
        # os._exit before it; kept for a rank whose destroy_process_group itself aborts).
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0
               and not (p.exitcode == -6 and (Path(out_dir) / f"rank{r}.pt").exists())]
        if bad:
            raise RuntimeError(f"workers exited abnormally (rank, exit code): {bad}")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
