"""The test suite; its layout mirrors the packages (``tests/<package>/test_*.py``)."""
