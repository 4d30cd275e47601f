"""The `modkern` command line: one subcommand per module in this package.

Every subcommand module defines `add_parser(subparsers)` and `run(args) -> int`. Errors that
modkern raises on bad input end the program with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .._version import __version__
from ..errors import ModkernError

# Subcommand name -> module of modkern.cli (imported lazily: `--help` stays fast).
COMMANDS = {
    "demo": "demo",
    "generate": "generate",
    "merge": "merge",
    "sweep": "sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modkern",
        description="Mixture of Distributions (MoD) merging and mixture decoding for "
        "Hugging Face models, with fused Triton kernels on the GPU.",
    )
    parser.add_argument("--version", action="version", version=f"modkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f"modkern.cli.{module}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"modkern.cli.{COMMANDS[args.command]}")
    try:
        return int(module.run(args) or 0)
    except ModkernError as err:
        print(f"modkern {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modkern {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
