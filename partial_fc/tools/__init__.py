"""Command-line tools (each module has ``main(argv=None)``): pack, inspect, synthetic, eval, export, extract, summary."""
