"""Entry point: see partial_fc/tools/export.py (also installed as the pfc-export console script)."""
from partial_fc.tools.export import main

if __name__ == "__main__":
    raise SystemExit(main())
