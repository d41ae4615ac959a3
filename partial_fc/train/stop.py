"""A request to checkpoint and stop a run: a signal a rank received, or a stop file it sees.

Every rank keeps a :class:`StopRequest`; the trainer sums the ranks' votes in the all-reduce each
step already does, so all ranks stop after the same step. After that step's checkpoint the stop
file is removed and, when the run stopped before its end, ``<stop file>.stopped`` is written (the
step), which tells a batch script to requeue the job (launch/slurm/requeue.sh).
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)


def _ignore_unless_from_parent(signum: int) -> None:
    """In a child forked while the stop handler is in place (a DataLoader or pool worker): ignore
    ``signum`` from anyone but the parent, end by it (its default action) when the parent sends it.

    Slurm (``scancel --signal``, preemption, ``--signal`` without ``B:``) signals every process
    of a step, workers included; the rank checkpoints, and its workers must outlive the request.
    But ``Pool.terminate()`` and ``Process.terminate()`` end children with SIGTERM, which must keep
    working with ``trainer.stop_signal=SIGTERM``. A Python handler cannot see the sender, so the
    signal stays blocked in every thread and one watcher thread takes it with ``sigwaitinfo``,
    which reports the sender's pid. Programs such a child execs inherit the blocked signal;
    children started by exec (multiprocessing's ``spawn``) inherit nothing and keep the signal's
    default action (Linux's DataLoader and Pool fork).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signum})

    def watch():
        while True:
            info = signal.sigwaitinfo({signum})
            if info.si_pid == os.getppid():
                # signal.signal() works in the main thread only, which may be blocked in a
                # queue read: restore the default action through libc and re-raise it here.
                ctypes.CDLL(None, use_errno=True).signal(int(signum), 0)  # 0: SIG_DFL
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
                signal.pthread_kill(threading.get_ident(), signum)  # ends the process
                return

    threading.Thread(target=watch, name=f"pfc-{signal.Signals(signum).name}-watch", daemon=True).start()


class StopRequest:
    """Whether this process was asked to checkpoint and stop.

    Args:
        path: the stop file; its appearance is a request.
        poll_s: look for the file at most this often (on a shared file system a lookup can cost a
            millisecond; 0: at every step).
        signal_name: a signal (e.g. ``"SIGUSR1"``) that is a request too, once :meth:`install`
            has put the handler in place; None: no handler.
    """

    def __init__(self, path, poll_s: float, signal_name: Optional[str]):
        self.path = Path(path)
        self.poll_s = float(poll_s)
        self.signal_name = signal_name or None
        self.signalled = False
        self._polled_at = -math.inf
        self._installed = False
        self._fork_hook_registered = False  # os.register_at_fork cannot be undone: once
        self._handler = None

    @property
    def marker(self) -> Path:
        """Written after a stop before the run's end: ``<stop file>.stopped``."""
        return self.path.with_name(self.path.name + ".stopped")

    def install(self) -> Callable[[], None]:
        """Make the signal a request from now on (main thread only; a second call does nothing);
        returns the function that puts the previous handler back."""
        if (self._installed or not self.signal_name
                or threading.current_thread() is not threading.main_thread()):
            return lambda: None
        signum = signal.Signals[self.signal_name]
        owner = os.getpid()

        def on_signal(received, frame):
            if os.getpid() == owner:
                self.signalled = True  # acted on at the end of the current step
            # else: a forked child before its watcher took over; the parent acts on it

        def in_forked_child():
            if self._installed and signal.getsignal(signum) is self._handler:
                _ignore_unless_from_parent(signum)

        if not self._fork_hook_registered:
            os.register_at_fork(after_in_child=in_forked_child)
            self._fork_hook_registered = True
        previous = signal.signal(signum, on_signal)
        self._handler, self._installed = on_signal, True

        def restore():
            signal.signal(signum, previous)
            self._installed = False

        return restore

    def vote(self) -> bool:
        """This rank's vote: it received the signal, or (looked at most every ``poll_s``) the
        stop file exists. A failing lookup (a stale NFS handle, say) votes no, with a warning:
        an advisory check must not take the run down."""
        if self.signalled:
            return True
        now = time.monotonic()
        if now - self._polled_at < self.poll_s:
            return False
        self._polled_at = now
        try:
            return self.path.exists()
        except OSError as err:
            log.warning("cannot look for the stop file %s (%s); carrying on", self.path, err)
            return False

    def discard_stale(self, resumed_from: Optional[Path]) -> None:
        """At the start of a run: a stop file older than the checkpoint this start resumes from
        was left behind (the stop it asked for has happened) and must not stop this start; the
        marker of an earlier stop goes too."""
        try:
            self.marker.unlink(missing_ok=True)
            if resumed_from is not None and self.path.stat().st_mtime < Path(resumed_from).stat().st_mtime:
                self.path.unlink(missing_ok=True)
                log.warning("removed the stop file %s: it is older than checkpoint %s", self.path, resumed_from)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("cannot check the stop file %s (%s)", self.path, err)

    def acknowledge(self, step: int, unfinished: bool) -> None:
        """After the checkpoint of the stopping step: write the marker (when the run stopped
        before its end) and remove the stop file. Every rank does it: the file may be node-local."""
        try:
            if unfinished:  # also after a signal, when no one created the file (or its folder)
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.write_text(f"{step}\n")
            self.path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("cannot update the stop file %s (%s)", self.path, err)
