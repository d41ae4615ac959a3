"""Entry point: see partial_fc.tools.synthetic (also installed as pfc-synthetic)."""
import sys

from partial_fc.tools.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
