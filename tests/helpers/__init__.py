"""Helpers the tests share: gloo workers, float64 references, small data sets, run harnesses.

Imported as ``tests.helpers.<module>`` (pytest puts the repository root on ``sys.path`` because
``tests/`` is a package)."""
