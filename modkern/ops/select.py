"""`mod_select` and `mod_select_`: the MoD weight select of one tensor pair, validated and
run through the select pipeline (select_pipeline.py) on the engine of the chosen backend.

Both engines run the same passes: a min/max pass over t1 that, out of place, also copies
t1 into the output; then a patch pass that writes t2's elements where `t1 >= v`, v being
the exact threshold of select_reference.select_threshold. The torch engine runs a few
vectorized torch ops per pass, the Triton engine one kernel.
"""

from __future__ import annotations

import torch

from ..backends import resolve_backend
from ..checks import check_alpha, check_precision
from . import select_engine
from .select_context import SelectContext
from .select_pipeline import select_inplace, select_into


def _checked(t1: torch.Tensor, t2: torch.Tensor, alpha: float, backend: str,
             precision: str, name: str | None):
    """The arguments both forms share, validated: (alpha, precision, engine, context)."""
    context = SelectContext(name)
    alpha = check_alpha(alpha, "alpha" if name is None else f"alpha for tensor {name!r}")
    precision = check_precision(precision)
    context.check_pair(t1, t2)
    engine = select_engine.engine_for(resolve_backend(backend, t1, t2))
    return alpha, precision, engine, context


def mod_select(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, backend: str = "auto",
               precision: str = "exact", out: torch.Tensor | None = None,
               name: str | None = None) -> torch.Tensor:
    """MoD select of one tensor pair (DESIGN.md 1.1): t1's element where its min-max
    normalized value is below alpha, t2's element elsewhere.

    Args:
        t1: the base model's tensor (floating point, finite).
        t2: the other model's tensor, same shape and device; only the elements that are
            taken are read (and must be finite).
        alpha: threshold in [0, 1]. 1 keeps t1 except at its maximum; 0 takes all of t2.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".
        precision: "exact" (float32 formula) or "reference" (the released code's arithmetic
            in t1's own dtype, bit for bit).
        out: optional tensor of t1's shape and dtype to write into.
        name: the tensor's key, used in error messages.

    Returns a tensor of t1's dtype and shape; t1 and t2 are not modified.
    """
    alpha, precision, engine, context = _checked(t1, t2, alpha, backend, precision, name)
    if out is not None:
        if out.shape != t1.shape or out.dtype != t1.dtype or out.device != t1.device:
            raise context.bad_out(t1, out)
        if out.data_ptr() == t1.data_ptr() and out.numel() > 0:
            select_inplace(t1, t2, alpha, precision=precision, engine=engine, context=context)
            return t1
    usable = out is not None and out.is_contiguous() and out.data_ptr() != t2.data_ptr()
    dst = out if usable else torch.empty(t1.shape, dtype=t1.dtype, device=t1.device)
    select_into(dst, t1, t2, alpha, precision=precision, engine=engine, context=context)
    if out is not None and dst is not out:
        out.copy_(dst)
        return out
    return dst


def mod_select_(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, backend: str = "auto",
                precision: str = "exact", name: str | None = None) -> torch.Tensor:
    """In-place MoD select: overwrite t1's elements that take t2's value, and return t1.

    The cheapest merge: one read of t1 plus the few blocks that hold selected elements.
    Everything is validated before t1 is touched, so on error t1 is unchanged.
    Same arguments as `mod_select`."""
    alpha, precision, engine, context = _checked(t1, t2, alpha, backend, precision, name)
    select_inplace(t1, t2, alpha, precision=precision, engine=engine, context=context)
    return t1
