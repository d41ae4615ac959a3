"""Hydra callbacks of ``launch/train.py`` (``hydra.callbacks`` in ``conf/config.yaml``)."""
from __future__ import annotations

import sys

from hydra.experimental.callback import Callback

from ..outputs import OutputError, make_folder


class RunFolderCheck(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): the run folder (or a
    multirun's sweep folder) that Hydra is about to create, created first here, so that one that
    cannot be (a file in the way, a read-only mount) ends ``launch/train.py`` with one
    ``train.py: error: ...`` line and exit status 2 rather than Hydra's traceback."""

    def on_run_start(self, config, **kwargs) -> None:
        self._make(config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._make(config.hydra.sweep.dir)

    @staticmethod
    def _make(path) -> None:
        from ..tools.common import INPUT_ERROR_STATUS, error_line

        try:
            make_folder(str(path), "the run folder")
        except OutputError as err:
            print(error_line("train.py", err), file=sys.stderr, flush=True)
            sys.exit(INPUT_ERROR_STATUS)
