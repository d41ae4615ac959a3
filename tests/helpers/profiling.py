"""What ``torch.profiler`` saw in a step: operations per ``trainer/<phase>`` range, host syncs
and who issued them."""
from __future__ import annotations

from collections import Counter
from typing import Dict, Optional

from partial_fc.classifier.collectives import HOST_SYNC_EVENTS

# The classifier's code (its own owner): a sync whose innermost project frame lies in one of
# these files is the classifier's; any other project frame (partial_fc/train, partial_fc/data,
# the models) makes it the trainer's.
CLASSIFIER_FILES = ("partial_fc/classifier/", "npc_head/")
PROJECT_DIRS = ("partial_fc/", "npc_head/")


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def top_level_ops(prof) -> Counter:
    """``{phase: count}`` of the aten operations the code issued itself (not those an operation
    runs inside it), by the innermost ``trainer/<phase>`` range holding them (None: outside)."""
    counts: Counter = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        ancestors = list(_ancestors(event))
        if any(a.name.startswith("aten::") for a in ancestors):
            continue
        phase = next((a.name for a in ancestors if a.name.startswith("trainer/")), None)
        counts[phase] += 1
    return counts


def _owner(event) -> Optional[str]:
    for frame in _ancestors(event):
        if ".py(" in frame.name and any(d in frame.name for d in PROJECT_DIRS) and "tests/" not in frame.name:
            return "classifier" if any(f in frame.name for f in CLASSIFIER_FILES) else "trainer"
    return None


def host_syncs(prof) -> Dict[Optional[str], int]:
    """``{owner: count}`` of device-to-host reads (``HOST_SYNC_EVENTS``), by who issued
    them: "classifier", "trainer" (the loop, DDP and the scaler it calls, the data), or None
    (no project frame: the test itself). Needs ``profile(with_stack=True)``."""
    return dict(Counter(_owner(e) for e in prof.events() if e.name in HOST_SYNC_EVENTS))
