"""Entry point: see partial_fc/tools/extract.py (also installed as the pfc-extract console script)."""
from partial_fc.tools.extract import main

if __name__ == "__main__":
    raise SystemExit(main())
