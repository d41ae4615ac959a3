"""Entry point: see partial_fc.tools.inspect (also installed as pfc-inspect)."""
import sys

from partial_fc.tools.inspect import main

if __name__ == "__main__":
    sys.exit(main())
