"""Order-preserving parallel map over worker processes, for the packing and generation tools."""
from __future__ import annotations

import multiprocessing as mp
from typing import Callable, Iterable, Iterator

__all__ = ["imap_ordered"]


def imap_ordered(func: Callable, tasks: Iterable, workers: int, chunksize: int = 1) -> Iterator:
    """``func(task)`` for each task, in task order, computed by ``workers`` processes (forked
    where the platform can; in this process when ``workers <= 1``). The pool ends with the
    iteration, also when the caller stops early: close the generator (``contextlib.closing``)."""
    if workers <= 1:
        yield from map(func, tasks)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers)
    try:
        yield from pool.imap(func, tasks, chunksize=chunksize)
    finally:
        pool.terminate()
        pool.join()
