"""Writing outputs (a run folder, a tool's output file): a file that cannot be written (a full
disk, a file size limit, a file where a folder must be, a read-only mount) raises OutputError,
one line that names the file, what it is for and the system's reason, instead of a traceback
from inside ``torch.save``."""
from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


class OutputError(OSError):
    """A file or folder of the run could not be written; ``str()`` is one line naming it, what it
    holds and why; ``errno`` is the system's."""

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        self.errno = code


def os_error_in(err: Optional[BaseException]) -> Optional[OSError]:
    """``err`` itself when an OSError, else the first OSError it was raised from or while
    handling (``torch.save`` reports a failed write as RuntimeError "unexpected pos", chained to
    the OSError of the write); None when there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _reason(cause: OSError, path: PathLike) -> str:
    where = cause.filename if cause.filename not in (None, "") else None
    if cause.errno in (errno.EEXIST, errno.ENOTDIR) and where is not None:
        # a folder was needed where a file is (or below one)
        blocker = next((p for p in [os.fspath(where), *_parents(os.fspath(where))]
                        if os.path.isfile(p)), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    text = cause.strerror or str(cause) or type(cause).__name__
    if where is not None and os.fspath(where) != os.fspath(path):
        text += f" ({os.fspath(where)})"
    return text


def _parents(path: str):
    while True:
        parent = os.path.dirname(path)
        if not parent or parent == path:
            return
        yield parent
        path = parent


@contextlib.contextmanager
def writing(path: PathLike, what: str) -> Iterator[None]:
    """Run a block that writes ``what`` (e.g. "the TensorBoard log") at ``path``: an OSError it
    raises, directly or under ``torch.save``'s RuntimeError, becomes OutputError
    ``cannot write <what> <path>: <reason>``; other errors pass unchanged."""
    try:
        yield
    except OutputError:
        raise
    except (OSError, RuntimeError) as err:
        cause = os_error_in(err)
        if cause is None:
            raise
        raise OutputError(f"cannot write {what} {os.fspath(path)}: {_reason(cause, path)}", cause.errno) from None


def make_folder(path: PathLike, what: str) -> None:
    """Create folder ``path`` (and its parents) unless it exists; OutputError as in :func:`writing`."""
    with writing(path, what):
        os.makedirs(path, exist_ok=True)
