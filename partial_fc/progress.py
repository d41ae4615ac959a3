"""Progress bars of the tools: tqdm, shown only on a terminal, so that pipes and log files get no
carriage-return spam."""
from __future__ import annotations

from typing import Any, Iterable, Optional

from tqdm import tqdm


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) that draws nothing when `enabled` is False or stderr is not a TTY
    (tqdm's `disable=None`); bars are cleared when done unless `leave=True` is given."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
