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
from .output_memory import empty_output
from .select_context import SelectContext
from .select_pipeline import select_inplace, select_into
from .tensor_memory import shares_memory, view_key, write_mode


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
    """MoD select of one tensor pair (docs/design.md 1.1): t1's element where its min-max
    normalized value is below alpha, t2's element elsewhere.

    Args:
        t1: the base model's tensor (dense, floating point, finite; any strides).
        t2: the other model's tensor, same shape and device; only the elements that are
            taken are read (and must be finite).
        alpha: threshold in [0, 1]. 1 keeps t1 except at its maximum; 0 takes all of t2.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".
        precision: "exact" (float32 formula) or "reference" (the released code's arithmetic
            in t1's own dtype, bit for bit).
        out: optional tensor of t1's shape and dtype to write into (it may share memory
            with t1 or t2: the result is what they held before the call).
        name: the tensor's key, used in error messages.

    Returns a tensor of t1's dtype and shape; t1 and t2 are not modified. The select is not
    a differentiable operation: the result is a plain tensor (requires_grad False, no
    autograd history) even when t1 or t2 require grad.
    """
    alpha, precision, engine, context = _checked(t1, t2, alpha, backend, precision, name)
    if out is not None:
        context.check_out(t1, out)
    with write_mode([] if out is None else [out]):
        if out is not None and out.numel() > 0 and view_key(out) == view_key(t1):
            select_inplace(t1, t2, alpha, precision=precision, engine=engine, context=context)
            return out
        usable = out is not None and out.is_contiguous() and not shares_memory(out, t1) \
            and not shares_memory(out, t2)
        dst = out if usable else empty_output(t1.shape, t1.dtype, t1.device)
        select_into(dst, t1, t2, alpha, precision=precision, engine=engine, context=context)
        if out is not None and dst is not out:
            out.copy_(dst)
            return out
        return dst


def mod_select_(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, backend: str = "auto",
                precision: str = "exact", name: str | None = None) -> torch.Tensor:
    """In-place MoD select: overwrite t1's elements that take t2's value, and return t1.

    The cheapest merge: one read of t1 plus the few blocks that hold selected elements.
    Everything is validated before t1 is touched, so on error t1 is unchanged. The write
    is a data update that autograd does not record (as an optimizer step's): t1 may be a
    Parameter or any tensor that requires grad, or an inference tensor. t1's elements must
    each have their own memory (not an expanded view); t2 may share memory with t1.
    Same arguments as `mod_select`."""
    alpha, precision, engine, context = _checked(t1, t2, alpha, backend, precision, name)
    context.check_writable(t1)
    with write_mode([t1]):
        select_inplace(t1, t2, alpha, precision=precision, engine=engine, context=context)
    return t1
