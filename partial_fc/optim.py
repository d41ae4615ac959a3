"""``partial_fc.optim``: the classifier's row-sparse optimizers, kept under this name for
scripts and configs; they live in :mod:`partial_fc.classifier.optim`."""
from .classifier.optim import *  # noqa: F401,F403
from .classifier.optim import __all__  # noqa: F401
