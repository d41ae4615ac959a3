"""Entry point: see partial_fc.tools.pack (also installed as pfc-pack)."""
import sys

from partial_fc.tools.pack import main

if __name__ == "__main__":
    sys.exit(main())
