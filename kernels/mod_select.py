"""MoD weight select in Triton: the two passes of modkern.select, one kernel each.

1. `_minmax_kernel`: each program takes one BLOCK of t1, writes that block's min and max
   (NaN if the block holds a NaN) and, out of place, copies the block to the output.
   The global min/max is a tiny reduction of the per-block values; the per-block max also
   tells the second pass which blocks can hold an element that comes from t2.
2. `_patch_kernel`: each program reads its block's max; below the threshold v it does
   nothing at all. Otherwise it compares its block of t1 with v (no division: see
   modkern/select_reference.py for why `t1 < v` is the exact formula), loads t2 only where
   selected, checks those values are finite and stores them.

Offsets are 64-bit: tensors may exceed 2**31 elements. The engine interface (`minmax`,
`patch`) matches modkern.select_torch's, so modkern.select drives both the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .convert import convert_like_torch, narrow, widen

BLOCK = 4096


@triton.jit
def _minmax_kernel(src_ptr, dst_ptr, bmin_ptr, bmax_ptr, n,
                   COPY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(src_ptr + offs, mask=inside)
    if COPY:
        tl.store(dst_ptr + offs, x, mask=inside)
    xf = widen(x, ACC)
    lo = tl.min(tl.where(inside, xf, float("inf")), axis=0)
    hi = tl.max(tl.where(inside, xf, float("-inf")), axis=0)
    # tl.min/tl.max may drop NaNs: make a NaN visible to the host's finiteness check.
    has_nan = tl.sum((inside & (xf != xf)).to(tl.int32), axis=0) > 0
    dtype = bmin_ptr.dtype.element_ty
    tl.store(bmin_ptr + pid, narrow(tl.where(has_nan, float("nan"), lo), dtype))
    tl.store(bmax_ptr + pid, narrow(tl.where(has_nan, float("nan"), hi), dtype))


@triton.jit
def _patch_kernel(dst_ptr, t2_ptr, v_ptr, bmax_ptr, taken_ptr, bad_ptr, n,
                  WRITE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    v = widen(tl.load(v_ptr), ACC)
    block_max = widen(tl.load(bmax_ptr + pid), ACC)
    if block_max >= v:  # only blocks that hold an element to take are read again
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(dst_ptr + offs, mask=inside, other=0.0)
        take = inside & (widen(x, ACC) >= v)
        y = convert_like_torch(tl.load(t2_ptr + offs, mask=take, other=0.0),
                               dst_ptr.dtype.element_ty)
        yf = widen(y, ACC)  # ACC: a float64 y may be finite beyond float32's range
        finite = (yf == yf) & (tl.abs(yf) != float("inf"))
        bad = take & ~finite
        first_bad = tl.min(tl.where(bad, offs, n), axis=0)
        if first_bad < n:
            tl.atomic_min(bad_ptr, first_bad)
        if WRITE:
            tl.store(dst_ptr + offs, y, mask=take & finite)
        tl.atomic_add(taken_ptr, tl.sum(take.to(tl.int64), axis=0))


def _acc(dtype: torch.dtype):
    """Comparisons and reductions run in float32 (float64 for float64): exact for the
    values of every input dtype, since nothing is computed, only compared."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def minmax(src: torch.Tensor, copy_to: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) of the contiguous 1-D `src`, in src's dtype (exact: they are
    elements of src), copying src to `copy_to` on the way when given."""
    n = src.numel()
    blocks = triton.cdiv(n, BLOCK)
    bmin = torch.empty(blocks, dtype=src.dtype, device=src.device)
    bmax = torch.empty(blocks, dtype=src.dtype, device=src.device)
    _minmax_kernel[(blocks,)](src, copy_to if copy_to is not None else src, bmin, bmax, n,
                              COPY=copy_to is not None, ACC=_acc(src.dtype), BLOCK=BLOCK)
    return bmin, bmax


def patch(dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor, block_max: torch.Tensor,
          write: bool = True) -> tuple[int, int]:
    """Write t2's elements into the contiguous 1-D `dst` wherever dst >= v (dst holds t1),
    visiting only blocks whose max reaches v. t2: contiguous, dst's size, any float dtype.
    Returns (elements taken, flat index of the first non-finite selected t2 element or -1);
    with a non-finite element nothing of it is stored, and the caller raises."""
    n = dst.numel()
    blocks = triton.cdiv(n, BLOCK)
    taken = torch.zeros(1, dtype=torch.int64, device=dst.device)
    bad = torch.full((1,), n, dtype=torch.int64, device=dst.device)
    v = v.reshape(1).to(dst.dtype)
    _patch_kernel[(blocks,)](dst, t2.reshape(-1), v, block_max, taken, bad, n,
                             WRITE=write, ACC=_acc(dst.dtype), BLOCK=BLOCK)
    taken_n, bad_at = torch.cat([taken, bad]).tolist()  # one device sync
    return taken_n, (bad_at if bad_at < n else -1)
