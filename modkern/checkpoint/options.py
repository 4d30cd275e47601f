"""The options of a checkpoint merge: `MergeOptions`, validated once when made (the
boundary every merge entry point goes through), and the parsing of options given as text
(command line, recipe files)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends import resolve_backend_on
from ..checks import check_precision, check_vocab
from ..errors import BackendError, CheckpointError, DTypeError
from ..merging.patterns import AlphaRule, Patterns, check_alpha_rule, pattern_list
from .hooks import NO_HOOKS, MergeHooks
from .shard_writer import parse_size

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


def parse_path(path, label: str) -> Path:
    """A folder path given to the Python API (`label`: BASE, OTHER, OUT) as a Path:
    CheckpointError naming it and what is expected unless it is a non-empty str or
    os.PathLike of str without a NUL byte (bytes, None, a number are refused: a number
    would be taken for an open file descriptor by os functions)."""
    value = path
    if isinstance(path, os.PathLike):
        try:
            value = os.fspath(path)
        except Exception as err:  # noqa: BLE001 - a user's __fspath__ may raise anything
            raise CheckpointError(f"{label} {path!r}: its __fspath__ failed ({err}); expected "
                                  "a folder path") from None
    if isinstance(value, bytes):
        raise CheckpointError(f"{label} {path!r}: a bytes path; expected a str or os.PathLike "
                              "of str (decode it with os.fsdecode)")
    if not isinstance(value, str):
        raise CheckpointError(f"{label} {path!r}: a {type(value).__name__}; expected a folder "
                              "path (str or os.PathLike)")
    if not value:
        raise CheckpointError(f"{label} '': an empty path; expected a folder path (use '.' "
                              "for the current folder)")
    if "\0" in value:
        raise CheckpointError(f"{label} {value!r}: contains a NUL byte; expected a folder "
                              "path (no file name can hold one)")
    return Path(value)


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device of those) that this machine has ->
    torch.device; BackendError naming the value and what is expected otherwise."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and re.fullmatch(r"(cpu|cuda)(:\d{1,4})?", device):
        dev = torch.device(device)
    else:
        raise BackendError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N' (N a GPU "
                           "index such as 0)")
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device {device!r}: expected 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r}: no CUDA device is available here; use "
                           "--device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                           f"GPU(s), numbered from 0; expected cuda:0 to "
                           f"cuda:{torch.cuda.device_count() - 1}")
    return dev


@dataclass
class MergeOptions:
    """What a checkpoint merge is asked to do, besides the folders (see merge_checkpoints
    for each option's meaning). Made once from the caller's values, which it checks and
    normalizes: alpha (numbers checked), include/exclude (lists of strings or None),
    precision, vocab, backend (with `resolved_backend`, the one that runs on `device`),
    device (a torch.device), dtype (a torch dtype or None), max_shard_size (bytes). `progress` and
    `hooks` change how the merge runs, not what it writes."""

    alpha: AlphaRule
    include: Patterns = None
    exclude: Patterns = None
    strict: bool = True
    precision: str = "exact"
    vocab: str = "strict"
    backend: str = "auto"
    device: str | torch.device = "cpu"
    dtype: torch.dtype | str | None = None
    max_shard_size: str | int = "5GB"
    force: bool = False
    full_hash: bool = False
    extra_recipe: Mapping | None = None
    progress: bool | None = None
    hooks: MergeHooks = field(default=NO_HOOKS, repr=False)

    def __post_init__(self) -> None:
        self.precision = check_precision(self.precision)
        self.vocab = check_vocab(self.vocab)
        self.alpha = check_alpha_rule(self.alpha)
        self.include, self.exclude = pattern_list(self.include), pattern_list(self.exclude)
        self.dtype = parse_dtype(self.dtype)
        self.max_shard_size = parse_size(self.max_shard_size)
        self.device = parse_device(self.device)
        self.resolved_backend = resolve_backend_on(self.backend, self.device.type == "cuda")
