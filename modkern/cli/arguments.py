"""What the subcommands' parsers share: value types, each refusing a bad value with a message
naming what was expected (argparse prints it on one line, exit code 2), the options that
choose a merge's tensors, and the parser of a subcommand."""

from __future__ import annotations

import argparse
import math

# torch.manual_seed takes 64-bit seeds; the demo adds small offsets to its seed.
MAX_SEED = 2**62
MAX_COUNT = 10**9  # far above any useful run of steps, examples or tokens


def whole_number(minimum: int, maximum: int | None = None):
    """A type for a whole number in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}{upper}, "
                                             f"got {text!r}")
        return value
    return parse


def seed(text: str) -> int:
    """A type for a random seed: a whole number in [0, MAX_SEED)."""
    return whole_number(0, MAX_SEED - 1)(text)


def real_number(low: float, high: float, low_open: bool = False):
    """A type for a finite number in [low, high], or (low, high] when `low_open`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ((low < value if low_open else low <= value) and value <= high):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"expected a number in {bracket}{low:g}, "
                                             f"{high:g}], got {text!r}")
        return value
    return parse


def number_list(example: str):
    """A type for a non-empty comma-separated list of numbers (`example` shows one); the
    values are checked by the command (their range depends on it)."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = None
        if not values:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. "
                                             f"{example}; got {text!r}")
        return values
    return parse


def add_tensor_choice(p: argparse.ArgumentParser) -> None:
    """--include, --exclude, --no-strict and --precision: which tensors a merge selects and
    how (defaults None: the command fills them in, e.g. from a recipe)."""
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="merge only tensors whose name matches (substring, or glob with "
                   "*?[); repeatable")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="never merge tensors whose name matches; repeatable")
    p.add_argument("--no-strict", dest="strict", action="store_false", default=None,
                   help="allow tensors present in one model only (BASE's are carried over, "
                   "OTHER's ignored)")
    p.add_argument("--precision", choices=("exact", "reference"), default=None,
                   help="exact: float32 formula (default); reference: the released code's "
                   "arithmetic in the weights' dtype, bit for bit")


def subcommand(sub: argparse._SubParsersAction, name: str, summary: str,
               doc: str | None) -> argparse.ArgumentParser:
    """The parser of `modkern NAME`: `summary` in `modkern --help`, the module docstring
    `doc` (kept as written) in `modkern NAME --help`."""
    return sub.add_parser(name, help=summary, description=doc,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_count(p: argparse.ArgumentParser, flag: str, summary: str, default: int | None = None,
              maximum: int = MAX_COUNT) -> None:
    """An option taking a whole number N in [1, maximum] (steps, examples, tokens)."""
    p.add_argument(flag, type=whole_number(1, maximum), default=default, metavar="N",
                   help=summary)


def add_force(p: argparse.ArgumentParser, what: str = "OUT") -> None:
    """--force: replace an existing output folder, atomically."""
    p.add_argument("--force", action="store_true",
                   help=f"replace {what} if it exists (the previous {what} stays intact until "
                   "the new one is complete)")


def add_quiet(p: argparse.ArgumentParser, summary: str) -> None:
    """--quiet / -q: what the command then leaves out."""
    p.add_argument("--quiet", "-q", action="store_true", help=summary)
