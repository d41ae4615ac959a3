"""Command-line tools (each module has ``main(argv=None)``)."""
