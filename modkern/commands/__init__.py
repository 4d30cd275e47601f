"""Subcommands of the `modkern` command line, one module each (see modkern.cli)."""
