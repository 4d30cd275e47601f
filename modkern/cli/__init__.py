"""The `modkern` command line: one subcommand per module in this package.

Every subcommand module defines `add_parser(subparsers)` and `run(args) -> int`.

How a command ends on an error (stderr, exit code):
- bad input or a failing system: one line `modkern CMD: error: ...`, exit code 2. That is
  every ModkernError (bad input: the message names the file, key or option and what was
  expected), every OSError (a disk full, a permission, a missing file: the message names
  the path, the reason and the errno), MemoryError, and a mistake on the command line
  itself (argparse's message, on one line).
- interrupted (Ctrl-C, SIGTERM during a merge): one line, exit code 130.
- anything else is a bug in modkern, not bad input: its traceback, then one line
  `modkern CMD: internal error: TYPE: message` asking for a report, exit code 1. It is
  never folded into a bare one-line error, so a bug is not mistaken for bad input.
A message is always printed on one line: control characters (newlines or terminal escapes
in a file name) are shown escaped.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
import traceback
from typing import Sequence

from .._version import __version__
from ..errors import ModkernError

# Subcommand name -> module of modkern.cli (imported lazily: `--help` stays fast).
COMMANDS = {
    "demo": "demo",
    "distill": "distill",
    "generate": "generate",
    "merge": "merge",
    "sweep": "sweep",
}


def printable(text: str) -> str:
    """`text` with undecodable bytes of file names or arguments shown as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(text: str) -> str:
    """`text` safe to print as one line: control characters (newline, carriage return,
    terminal escapes) and undecodable bytes shown as escapes."""
    text = printable(text)
    return re.sub(r"[\x00-\x1f\x7f-\x9f]",
                  lambda m: repr(m.group())[1:-1], text)


def describe_os_error(err: OSError) -> str:
    """'PATH: reason (ERRNO)', or 'A -> B: ...' for a rename; the type when there is no path."""
    code = errno.errorcode.get(err.errno or 0)
    reason = err.strerror or str(err) or type(err).__name__
    if code:
        reason += f" ({code})"
    if err.filename is None:
        return f"{type(err).__name__}: {reason}"
    where = str(err.filename) if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    return f"{where}: {reason}"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (and exit code 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="modkern",
        description="Mixture of Distributions (MoD) merging and mixture decoding for "
        "Hugging Face models, with fused Triton kernels on the GPU.",
    )
    parser.add_argument("--version", action="version", version=f"modkern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f"modkern.cli.{module}").add_parser(sub)
    return parser


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says memory ran out: MemoryError, torch's CUDA OutOfMemoryError, or the
    RuntimeError torch's CPU allocator raises (a tensor larger than the machine's memory,
    e.g. from a header that claims one)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text
                                              or "out of memory" in text.lower())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"modkern.cli.{COMMANDS[args.command]}")
    command = f"modkern {args.command}"
    try:
        return int(module.run(args) or 0)
    except ModkernError as err:
        message = str(err)
    except OSError as err:
        message = describe_os_error(err)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: keep its traceback, name it, exit 1
        if out_of_memory(err):
            message = (f"out of memory ({type(err).__name__}: {one_line(str(err))[:200]}); "
                       "expected enough free memory for the task")
            print(f"{command}: error: {message}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"{command}: internal error: {type(err).__name__}: {one_line(str(err))} (a bug "
              "in modkern, not a problem with your input: please report it with the "
              "traceback above)", file=sys.stderr)
        return 1
    print(f"{command}: error: {one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
