"""The random-number state of a training process: seeding, saving and restoring it.

A checkpoint holds each rank's state (:func:`rng_state`) so a resume on the same world size
continues the same random stream; a rank of a re-sharded run has no history and is seeded from
``(seed, rank, step)`` instead (:func:`resume_seed`).
"""
from __future__ import annotations

import random
from typing import Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (NumPy takes ``seed mod 2**32``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_seed(seed: int, rank: int) -> int:
    """The seed of ``rank`` at the start of a run (``trainer.seed``): distinct per rank."""
    return seed * 100003 + rank


def resume_seed(seed: int, rank: int, step: int) -> int:
    """The seed of ``rank`` resuming at ``step`` from a checkpoint of another world size."""
    return seed * 100003 + rank * 7919 + step


def rng_state() -> Dict:
    """This process's RNG states as tensors and numbers (loadable with ``weights_only=True``):
    keys ``torch``, ``numpy``, ``numpy_pos``, ``python``, ``python_version``, ``python_gauss``
    and, where CUDA is available, ``cuda``."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(py_words, dtype=torch.int64),
        "python_version": int(py_version),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA state only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((state["python_version"], tuple(int(w) for w in state["python"]),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
