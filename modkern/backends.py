"""Choosing between the pure-torch path and the Triton kernels.

`backend="auto"` takes Triton for CUDA tensors and torch otherwise. `"triton"` on CPU
tensors is allowed only under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton
is first imported), which is how CI checks every kernel without a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch

from .errors import BackendError

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when triton can be imported (it is optional)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None (blocked)
        return False


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU under Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> Literal["torch", "triton"]:
    """Return the backend that will run `tensors`, or raise BackendError saying why not."""
    return resolve_backend_on(backend, any(t.is_cuda for t in tensors))


def resolve_backend_on(backend: str, on_cuda: bool) -> Literal["torch", "triton"]:
    """The backend that will run tensors on a CUDA device (`on_cuda`) or on the CPU, or
    BackendError saying why `backend` cannot."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise BackendError("backend='triton' needs triton installed: pip install triton")
    if not on_cuda and not interpreter_enabled():
        raise BackendError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
            "imported; use backend='torch' (or 'auto') on the CPU"
        )
    return "triton"


def kernel_module(name: str) -> ModuleType:
    """Import and return `modkern.kernels.<name>`, one op's kernels (needs triton)."""
    return importlib.import_module(f"modkern.kernels.{name}")


def engine_module(backend: str, tensors: list[torch.Tensor], count: int, max_count: int,
                  torch_engine: ModuleType, kernels: str, what: str) -> ModuleType:
    """The module that runs an op on `tensors`: `torch_engine`, or the Triton kernels
    `modkern.kernels.<kernels>`, which take up to `max_count` inputs (`what`, e.g. "logits
    tensors") of bf16, fp16 or fp32. "auto" falls back to torch where they cannot;
    "triton" raises BackendError there."""
    fits = count <= max_count and all(t.dtype != torch.float64 for t in tensors)
    if backend == "auto" and not fits:
        return torch_engine
    if resolve_backend(backend, *tensors) == "torch":
        return torch_engine
    if not fits:
        raise BackendError(f"backend='triton' takes up to {max_count} {what} in bf16, fp16 "
                           f"or fp32, got {count} of dtypes "
                           f"{sorted({str(t.dtype) for t in tensors})}; use backend='torch'")
    return kernel_module(kernels)
