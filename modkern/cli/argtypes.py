"""Option types shared by the subcommands: argparse calls one on the option's text, and
reports an ArgumentTypeError as a one-line usage error with exit code 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive(cast: type = int) -> Callable[[str], float]:
    """A parser of numbers > 0 (and finite): whole numbers for cast=int."""
    kind = "a whole number" if cast is int else "a number"

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"expected {kind} > 0, got {text!r}")
        return value

    return parse


def numbers(text: str) -> tuple[float, ...]:
    """Numbers separated by commas ("0.5,0.5"), at least one."""
    try:
        values = tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. "
                                         f"0.5,0.5; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values
