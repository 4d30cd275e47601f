"""MoD weight select in Triton: the passes of the select pipeline (modkern/ops/
select_pipeline.py), one kernel each.

1. `_minmax_kernel`: each program takes one block of t1, writes that block's min and max
   (NaN if the block holds a NaN) and, out of place, copies the block to the output.
   The global min/max is a tiny reduction of the per-block values; the per-block max also
   tells the second pass which blocks can hold an element that comes from t2.
2. `_patch_kernel`: each program reads its block's max; below the threshold v it does
   nothing at all. Otherwise it compares its block of t1 with v (no division: see
   modkern/ops/select_reference.py for why `t1 < v` is the exact formula), loads t2 only where
   selected, checks those values are finite and stores them.
3. `_select_kernel` (for model 2 read from a file at the selected indices, not a tensor):
   the selected elements' flat indices, compacted on the device in two launches: COUNT
   writes each block's number of elements >= v (0 without reading a block whose max is
   below v); an exclusive scan of the counts (torch.cumsum: one value per block) gives
   each block its offset; EMIT then runs only the blocks that hold some (a bounded group
   of them per launch), each writing its indices, in order, at its offset.

The first two also run SEGMENTED: many small tensors packed end to end in one buffer, a
block table giving each program its block's start, end and tensor (segment), so a state
dict's hundreds of norms and biases cost two launches, not two per tensor.

Offsets are 64-bit: tensors may exceed 2**31 elements. `minmax`, `patch`, `count_selected`
and `emit_selected` are the launchers modkern.ops.select_engine.TritonEngine calls (the
select pipeline's engine protocol); every launch names its arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .convert import convert_like_torch, narrow, widen

BLOCK = 4096


@triton.jit
def _block_bounds(pid, n, start_ptr, end_ptr, SEGMENTED: tl.constexpr, BLOCK: tl.constexpr):
    """The [start, end) range of elements program `pid` owns."""
    if SEGMENTED:
        start = tl.load(start_ptr + pid)
        end = tl.load(end_ptr + pid)
    else:
        start = pid * BLOCK
        end = n
    return start, end


# Moves, for N elements of b bytes: N*b read from src; N*b written to dst with COPY; 2*b
# written per block of BLOCK elements (its min and max). Arguments: src (t1), dst (the
# output, with COPY), bmin/bmax (one value per block), n (elements), start/end (the block
# table, SEGMENTED only).
@triton.jit
def _minmax_kernel(src_ptr, dst_ptr, bmin_ptr, bmax_ptr, n, start_ptr, end_ptr,
                   COPY: tl.constexpr, SEGMENTED: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    start, end = _block_bounds(pid, n, start_ptr, end_ptr, SEGMENTED, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    inside = offs < end
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


# Moves, for N elements of b bytes: b read per block (its max); only in the blocks whose
# max reaches v, BLOCK*b read from dst, and per element taken t2's element read and b
# written (at alpha 0.9 few blocks qualify: about N*b/BLOCK in all). Arguments: dst (holds
# t1), t2, v (threshold, one per segment), bmax (block maxima), taken (count per segment),
# bad (first non-finite selected index), n, start/end/seg (the block table, SEGMENTED).
@triton.jit
def _patch_kernel(dst_ptr, t2_ptr, v_ptr, bmax_ptr, taken_ptr, bad_ptr, n,
                  start_ptr, end_ptr, seg_ptr,
                  WRITE: tl.constexpr, SEGMENTED: tl.constexpr, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seg = 0
    if SEGMENTED:
        seg = tl.load(seg_ptr + pid)
    v = widen(tl.load(v_ptr + seg), ACC)
    block_max = widen(tl.load(bmax_ptr + pid), ACC)
    if block_max >= v:  # only blocks that hold an element to take are read again
        start, end = _block_bounds(pid, n, start_ptr, end_ptr, SEGMENTED, BLOCK)
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        x = tl.load(dst_ptr + offs, mask=inside, other=0.0)
        take = inside & (widen(x, ACC) >= v)
        y = convert_like_torch(tl.load(t2_ptr + offs, mask=take, other=0.0),
                               dst_ptr.dtype.element_ty)
        yf = widen(y, ACC)  # ACC: a float64 y may be finite beyond float32's range
        finite = (yf == yf) & (tl.abs(yf) != float("inf"))
        first_bad = tl.min(tl.where(take & ~finite, offs, n), axis=0)
        if first_bad < n:
            tl.atomic_min(bad_ptr, first_bad)
        if WRITE:
            tl.store(dst_ptr + offs, y, mask=take & finite)
        tl.atomic_add(taken_ptr + seg, tl.sum(take.to(tl.int64), axis=0))


# Moves, for N elements of b bytes: b read per block (its max); only in the blocks whose
# max reaches v, BLOCK*b read; COUNT writes 8 bytes per such block, EMIT 8 bytes per
# selected element. Arguments: flat (t1), v (threshold), bmax (block maxima), counts (one
# per block, zeroed: COUNT), blocks/offsets (EMIT: program p runs block blocks[p] and writes
# its indices from idx[offsets[p]]), idx (EMIT: the output), n (elements).
@triton.jit
def _select_kernel(flat_ptr, v_ptr, bmax_ptr, counts_ptr, blocks_ptr, offsets_ptr, idx_ptr,
                   n, EMIT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block = pid
    if EMIT:
        block = tl.load(blocks_ptr + pid)
    v = widen(tl.load(v_ptr), ACC)
    if widen(tl.load(bmax_ptr + block), ACC) >= v:  # a block below v is never read
        offs = block * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(flat_ptr + offs, mask=inside, other=0.0)
        take = inside & (widen(x, ACC) >= v)
        if EMIT:
            # the k-th selected element of the block goes to slot offsets[p] + k
            slot = tl.load(offsets_ptr + pid) + tl.cumsum(take.to(tl.int64), axis=0) - 1
            tl.store(idx_ptr + slot, offs, mask=take)
        else:
            tl.store(counts_ptr + pid, tl.sum(take.to(tl.int64), axis=0))


def _acc(dtype: torch.dtype):
    """Comparisons and reductions run in float32 (float64 for float64): exact for the
    values of every input dtype, since nothing is computed, only compared."""
    return tl.float64 if dtype == torch.float64 else tl.float32


class BlockTable:
    """Blocks over segments packed end to end: block b covers [start[b], end[b]) of the
    packed buffer and belongs to segment seg[b]. Built on the host from the sizes alone."""

    def __init__(self, sizes: list[int], device: torch.device):
        starts, ends, segs = [], [], []
        offset = 0
        for k, size in enumerate(sizes):
            for s in range(offset, offset + size, BLOCK):
                starts.append(s)
                ends.append(offset + size)
                segs.append(k)
            offset += size
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        table = torch.tensor([starts, ends, segs], dtype=torch.int64)
        self.start, self.end, self.seg = table.to(device).unbind(0)
        self.blocks = len(starts)
        self.segments = len(sizes)


def _launch_args(n: int, table: BlockTable | None, device: torch.device):
    if table is None:
        dummy = torch.empty(1, dtype=torch.int64, device=device)
        return triton.cdiv(n, BLOCK), (dummy, dummy, dummy)
    return table.blocks, (table.start, table.end, table.seg)


def minmax(src: torch.Tensor, copy_to: torch.Tensor | None = None,
           table: BlockTable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) of the contiguous 1-D `src`, in src's dtype (exact: they are
    elements of src), copying src to `copy_to` on the way when given."""
    n = src.numel()
    blocks, (start, end, _) = _launch_args(n, table, src.device)
    bmin = torch.empty(blocks, dtype=src.dtype, device=src.device)
    bmax = torch.empty(blocks, dtype=src.dtype, device=src.device)
    _minmax_kernel[(blocks,)](
        src_ptr=src, dst_ptr=copy_to if copy_to is not None else src,
        bmin_ptr=bmin, bmax_ptr=bmax, n=n, start_ptr=start, end_ptr=end,
        COPY=copy_to is not None, SEGMENTED=table is not None, ACC=_acc(src.dtype),
        BLOCK=BLOCK)
    return bmin, bmax


def patch(dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor, block_max: torch.Tensor,
          atomic: bool = False, table: BlockTable | None = None
          ) -> tuple[int | list[int], int]:
    """Write t2's elements into the contiguous 1-D `dst` wherever dst >= v (dst holds t1),
    visiting only blocks whose max reaches v. t2: contiguous, dst's size, any float dtype.
    A non-finite selected t2 element is never stored (the caller raises); with `atomic`
    (in-place merges into the caller's t1) a first launch only checks, so that then
    nothing at all is written. With a `table`, v holds one threshold per segment and the
    count taken is a list, one per segment. Returns (taken, flat index of the first
    non-finite selected t2 element or -1)."""
    if atomic:
        _, bad = _patch(dst, t2, v, block_max, False, table)
        if bad >= 0:
            return 0, bad
    return _patch(dst, t2, v, block_max, True, table)


def _patch(dst, t2, v, block_max, write: bool, table: BlockTable | None):
    n = dst.numel()
    blocks, (start, end, seg) = _launch_args(n, table, dst.device)
    segments = table.segments if table is not None else 1
    counts = torch.zeros(segments + 1, dtype=torch.int64, device=dst.device)
    counts[-1] = n  # the last slot collects the first bad index (atomic min)
    v = v.reshape(-1).to(dst.dtype)
    _patch_kernel[(blocks,)](
        dst_ptr=dst, t2_ptr=t2.reshape(-1), v_ptr=v, bmax_ptr=block_max,
        taken_ptr=counts, bad_ptr=counts[-1:], n=n,
        start_ptr=start, end_ptr=end, seg_ptr=seg,
        WRITE=write, SEGMENTED=table is not None, ACC=_acc(dst.dtype), BLOCK=BLOCK)
    *taken, bad_at = counts.tolist()  # one device sync
    return (taken if table is not None else taken[0]), (bad_at if bad_at < n else -1)


def count_selected(flat: torch.Tensor, v: torch.Tensor, block_max: torch.Tensor
                   ) -> torch.Tensor:
    """Per block of the contiguous 1-D `flat`, the number of its elements >= v (int64, on
    the device); blocks whose max (`block_max`, from `minmax`) is below v are not read."""
    n = flat.numel()
    counts = torch.zeros(triton.cdiv(n, BLOCK), dtype=torch.int64, device=flat.device)
    if n:
        _select_kernel[(counts.numel(),)](
            flat_ptr=flat, v_ptr=v.reshape(1).to(flat.dtype), bmax_ptr=block_max,
            counts_ptr=counts, blocks_ptr=counts, offsets_ptr=counts, idx_ptr=counts, n=n,
            EMIT=False, ACC=_acc(flat.dtype), BLOCK=BLOCK)
    return counts


def emit_selected(flat: torch.Tensor, v: torch.Tensor, block_max: torch.Tensor,
                  blocks: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """The sorted flat indices of the elements >= v in the sorted `blocks` of `flat` (each
    holding some), compacted: block blocks[k] writes its own at offsets[k] on (the
    exclusive scan of their counts), `total` in all. int64, on flat's device."""
    idx = torch.empty(total, dtype=torch.int64, device=flat.device)
    if blocks.numel():
        _select_kernel[(blocks.numel(),)](
            flat_ptr=flat, v_ptr=v.reshape(1).to(flat.dtype), bmax_ptr=block_max,
            counts_ptr=idx, blocks_ptr=blocks, offsets_ptr=offsets, idx_ptr=idx,
            n=flat.numel(), EMIT=True, ACC=_acc(flat.dtype), BLOCK=BLOCK)
    return idx
