"""Parsing the options of a checkpoint merge given as text (command line, recipe files)."""

from __future__ import annotations

import re

import torch

from ..errors import BackendError, DTypeError

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


def parse_device(device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device of those) -> torch.device; BackendError
    naming the value and what is expected otherwise (also for a GPU index this machine
    does not have)."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and re.fullmatch(r"(cpu|cuda)(:\d{1,4})?", device):
        dev = torch.device(device)
    else:
        raise BackendError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N' (N a GPU "
                           "index such as 0)")
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device {device!r}: expected 'cpu' or 'cuda'")
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available() and \
            dev.index >= torch.cuda.device_count():
        raise BackendError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                           f"GPU(s), numbered from 0; expected cuda:0 to "
                           f"cuda:{torch.cuda.device_count() - 1}")
    return dev
