"""Command-line tools (`main(argv=None)` each): eval, export, extract."""
