"""Parsing the options of a checkpoint merge given as text (command line, recipe files)."""

from __future__ import annotations

import torch

from ..errors import DTypeError

DTYPE_ALIASES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                 "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                 "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating dtype, or a name such as 'bfloat16'/'bf16'."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_ALIASES:
        return DTYPE_ALIASES[dtype.lower().removeprefix("torch.")]
    raise DTypeError(f"dtype {dtype!r}: expected a floating-point dtype such as bfloat16, "
                     "float16 or float32")
