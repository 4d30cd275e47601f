"""Checks of arguments shared by every operation: alpha, precision, vocab, float dtypes."""

from __future__ import annotations

import math
import numbers

import torch

from .errors import AlphaError, OptionError

PRECISIONS = ("exact", "reference")
# How a merge treats models whose vocabularies differ in width: refuse, or use the rows (or
# columns) both have.
VOCAB_MODES = ("strict", "common")


# The dtypes the select computes in (float8 has no min/max or arithmetic on the CPU).
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_alpha(alpha: float, where: str = "alpha") -> float:
    """alpha as a Python float, or AlphaError if it is not a real number in [0, 1]."""
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
        if alpha.is_meta or alpha.is_nested:  # no value to read
            raise AlphaError(f"{where} must be a real number in [0, 1], got a "
                             f"{'meta' if alpha.is_meta else 'nested'} tensor")
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise AlphaError(f"{where} must be a real number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    if math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
        raise AlphaError(f"{where} must lie in [0, 1], got {alpha!r}")
    return alpha


def check_precision(precision: str) -> str:
    """precision itself, or OptionError if it is not one of PRECISIONS."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_vocab(vocab: str, where: str = "vocab", meaning: str = "") -> str:
    """vocab itself, or OptionError if it is not one of VOCAB_MODES (`meaning`, e.g.
    "('strict': ...; 'common': ...)", explains the modes in the message)."""
    if not isinstance(vocab, str) or vocab not in VOCAB_MODES:
        raise OptionError(f"{where} must be one of {VOCAB_MODES}{' ' + meaning if meaning else ''}"
                          f", got {vocab!r}")
    return vocab
