"""argparse value types shared by the subcommands: each refuses a bad value with a message
naming what was expected (argparse prints it on one line, exit code 2)."""

from __future__ import annotations

import argparse
import math

# torch.manual_seed takes 64-bit seeds; the demo adds small offsets to its seed.
MAX_SEED = 2**62


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
