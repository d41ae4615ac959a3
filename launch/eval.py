"""Entry point: see partial_fc/tools/eval.py (also installed as the pfc-eval console script)."""
from partial_fc.tools.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
