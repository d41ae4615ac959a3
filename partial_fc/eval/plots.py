"""ROC plots (PNG) with matplotlib's object API, so no global backend or pyplot state is touched."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Tuple, Union

import numpy as np


def plot_roc(curves: Mapping[str, Tuple[np.ndarray, np.ndarray]], path: Union[str, os.PathLike],
             title: str = "ROC") -> Path:
    """Plot `{name: (fpr, tpr)}` on a log-FAR axis into a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("no ROC curves to plot")
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    smallest = 1.0
    for name, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr, dtype=np.float64)
        positive = fpr > 0  # log axis: FAR 0 cannot be drawn
        if positive.any():
            smallest = min(smallest, float(fpr[positive].min()))
        ax.plot(fpr[positive], np.asarray(tpr)[positive], lw=1.5, label=name)
    ax.set_xscale("log")
    ax.set_xlim(max(min(smallest, 1e-3), 1e-7), 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", linestyle=":", linewidth=0.5)
    ax.legend(loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
