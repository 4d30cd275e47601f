"""MoD weight select on the CPU (or any device) in plain torch, fast: the torch engine's
passes (modkern.ops.select_engine.TorchEngine drives them).

The formula is `where(t1 < v, t1, t2)` with v from `select_threshold` (see
select_reference.py for why that is exact). The work is arranged around memory traffic;
every pass is a few vectorized torch ops, never a float32 copy:

1. `minmax`: one pass over t1, chunk by chunk, that takes each chunk's min and the max of
   every 4096-element block and, out of place, copies t1 into the output on the way;
2. `hot_blocks`: the blocks whose max reaches v (no pass over t1: their maxima are known),
   then `selected_chunks`: in those few blocks, the elements to take, a bounded group of
   blocks at a time. Model 2 is then read at just those elements (see
   select_source.take_at). At alpha 0.9 about 1e-5 of the elements come from t2, so t2 is
   barely touched.

For model 2 read from a file, the hot blocks go in groups (`hot_group_sizes`, the same on
every engine) and each group (`hot_group`) says how many elements it takes before any
index is built: a group that takes many is patched with `patch_where` over the range it
spans (no index at all), the others by their indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .select_reference import INT_OF_SIZE

BLOCK = 4096

HOT_GROUP = 256  # blocks whose selected elements are gathered per step (bounds memory)
# Model 2 read from a file goes by groups: the hot blocks of one window of this many blocks
# (4M elements; a group read whole is at most 8 MB of bf16).
SPAN_GROUP = 1024
# Up to this many elements, evaluating the formula itself costs less than the threshold
# search (about 0.3 ms of small torch ops): norms and biases take that path.
DIRECT_MAX = 1 << 14
# The min/max pass goes through t1 by chunks of this many bytes: a chunk is read from
# memory once (copied, out of place) and its min and block maxima are taken from the cache.
# Measured on a 2-vCPU EPYC VM (bench/results/cpu_select.md): 1 to 8 MB within a few %,
# smaller chunks pay more per-op overhead, larger ones fall out of the caches.
CHUNK_BYTES = 4 << 20


def minmax(src: torch.Tensor, copy_to: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mins, block_max) of the contiguous 1-D `src`: the minimum of each chunk of it (only
    their min is meant to be used; NaN where a chunk holds one) and the maximum of each
    BLOCK-sized block (the last one ragged), in src's dtype; copies src into `copy_to`
    when given. A block holding a NaN may show a number as its max: its chunk's min is
    NaN then.

    One pass, chunk by chunk on the CPU: each chunk is copied, then its min and its blocks'
    maxima are taken while it is still in the cache (memory is read once)."""
    n = src.numel()
    if n == 0:
        return src[:0].clone(), src[:0].clone()
    step = n if src.device.type != "cpu" else max(
        BLOCK, CHUNK_BYTES // (src.element_size() * BLOCK) * BLOCK)
    bits = src.view(INT_OF_SIZE[src.element_size()])
    top = torch.empty(-(-n // BLOCK), dtype=bits.dtype, device=src.device)
    mins = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        if copy_to is not None:
            copy_to[start:stop].copy_(src[start:stop])
        mins.append(torch.min(src[start:stop]))  # NaN-propagating, vectorized
        largest_bits(bits, start, stop, top)
    negative_blocks_max(bits, top)
    return torch.stack(mins), top.view(src.dtype)


def largest_bits(bits: torch.Tensor, start: int, stop: int, top: torch.Tensor) -> None:
    """The largest bit pattern (as a signed integer) of each block of bits[start:stop]
    (start a multiple of BLOCK), into `top` at its blocks. The bits of a non-negative float
    are non-negative integers in the float order, so where a block holds one this is its
    max (+inf, or a NaN above it). Integer reductions: several times faster than float ones
    on bf16/fp16."""
    whole = min(stop, bits.numel() // BLOCK * BLOCK)
    if whole > start:
        torch.amax(bits[start:whole].view(-1, BLOCK), dim=1,
                   out=top[start // BLOCK:whole // BLOCK])
    if whole < stop:  # the ragged last block
        torch.amax(bits[whole:stop], dim=0, out=top[-1])


def negative_blocks_max(bits: torch.Tensor, top: torch.Tensor) -> None:
    """Fix `top` (from `largest_bits`) for the blocks of negatives only: their bits are
    negative integers that grow with the magnitude, so their max, the negative nearest
    zero, is their smallest pattern. Such blocks are rare in weights: only they are read
    again."""
    negative = torch.nonzero(top < 0).flatten()
    if negative.numel() == 0:
        return
    n_full = bits.numel() // BLOCK
    whole = negative[negative < n_full]
    if whole.numel():
        rows = bits[:n_full * BLOCK].view(-1, BLOCK).index_select(0, whole)
        top[whole] = rows.amin(dim=1)
    if int(negative[-1]) == n_full:  # the ragged last block
        top[-1] = bits[n_full * BLOCK:].amin()


def hot_blocks(block_max: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Indices of the blocks (maxima `block_max`, from `minmax`) that hold an element >= v."""
    return torch.nonzero(block_max >= v.reshape(1).to(block_max.dtype)).flatten()


def selected_chunks(flat: torch.Tensor, v: torch.Tensor, hot: torch.Tensor
                    ) -> Iterator[torch.Tensor]:
    """Sorted flat indices of the elements of the contiguous 1-D `flat` that are >= v,
    HOT_GROUP of the (sorted) BLOCK-sized blocks `hot` at a time."""
    v = v.reshape(1).to(flat.dtype)
    for group in hot.split(HOT_GROUP):
        yield selected_in_blocks(flat, v, group)


def selected_in_blocks(flat: torch.Tensor, v: torch.Tensor,
                       blocks: torch.Tensor) -> torch.Tensor:
    """Flat indices of the elements >= v inside the given (sorted) blocks of `flat`."""
    n_full = flat.numel() // BLOCK
    whole = blocks[blocks < n_full]
    rows = flat[:n_full * BLOCK].view(-1, BLOCK).index_select(0, whole)
    r, c = torch.nonzero(at_least(rows, v), as_tuple=True)
    idx = whole[r] * BLOCK + c
    if blocks.numel() and int(blocks[-1]) == n_full:  # the ragged last block
        tail = torch.nonzero(at_least(flat[n_full * BLOCK:], v)).flatten() + n_full * BLOCK
        idx = torch.cat([idx, tail])
    return idx


def at_least(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where the finite float tensor x is >= v (1 element of x's dtype). For v > 0 the
    compare runs on the bits as integers (the same order there: every negative float's
    bits are negative integers), about 2x faster than a float compare on bf16."""
    if bool(v > 0):
        as_int = INT_OF_SIZE[x.element_size()]
        return x.view(as_int) >= v.reshape(1).view(as_int)
    return x >= v


def hot_group_sizes(hot: torch.Tensor) -> list[int]:
    """How the sorted hot block numbers `hot` split into groups, in order: those of each
    window of SPAN_GROUP blocks, so that what a group holds (its range when read whole, its
    indices otherwise) stays bounded. Every engine groups alike, so a file is read alike."""
    hot = hot.cpu()
    if hot.numel() == 0:
        return []
    return torch.unique_consecutive(hot // SPAN_GROUP, return_counts=True)[1].tolist()


@dataclass
class HotGroup:
    """A group of hot blocks of a flat tensor: blocks [first_block, end_block) hold them
    (flat indices [start, stop)), `count` of their elements are >= v, and `indices()`
    gives those elements' sorted flat indices."""

    first_block: int
    end_block: int
    start: int
    stop: int
    count: int
    indices: Callable[[], torch.Tensor]


def hot_group(flat: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor) -> HotGroup:
    """The group of the sorted hot `blocks` of `flat` (v in flat's dtype): its count from
    one compare over the blocks (a view when they are consecutive)."""
    b0, b1 = int(blocks[0]), int(blocks[-1]) + 1
    start, stop = b0 * BLOCK, min(b1 * BLOCK, flat.numel())
    if b1 - b0 == blocks.numel():  # consecutive blocks: no gather, no index yet
        take = at_least(flat[start:stop], v)
        return HotGroup(b0, b1, start, stop, int(torch.count_nonzero(take)),
                        lambda: torch.nonzero(take).flatten() + start)
    idx = selected_in_blocks(flat, v, blocks)
    return HotGroup(b0, b1, start, stop, idx.numel(), lambda: idx)


# Exponent bits of each float dtype: all set means an infinity or a NaN.
EXPONENT = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000,
            torch.float64: 0x7FF0000000000000}


def nonfinite(t: torch.Tensor) -> torch.Tensor:
    """Where the float tensor t is inf or NaN, from its bits (several times faster than
    torch.isfinite on bf16 on the CPU)."""
    if t.dtype not in EXPONENT:
        return ~torch.isfinite(t)
    mask = EXPONENT[t.dtype]
    return (t.view(INT_OF_SIZE[t.element_size()]) & mask) == mask


def patch_where(dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """Write t2's elements (converted to dst's dtype) into the contiguous 1-D `dst`
    wherever dst >= v, by masks over the whole range (for ranges that take many). Nothing
    is written if a selected value is not finite. Returns (elements taken, index in dst of
    the first non-finite selected value or -1)."""
    take = at_least(dst, v.reshape(1).to(dst.dtype))
    values = t2.to(dst.dtype)
    bad = take & nonfinite(values)
    if bool(bad.any()):
        return 0, int(bad.to(torch.uint8).argmax())
    # dst ^= (dst ^ t2) & mask on the bits: the same as torch.where(take, t2, dst), which
    # is scalar code on the CPU (about 40x slower on bf16 here)
    as_int = INT_OF_SIZE[dst.element_size()]
    bits = dst.view(as_int)
    diff = bits ^ values.view(as_int)
    diff &= take.to(as_int).neg_()  # all ones where taken
    bits ^= diff
    return int(torch.count_nonzero(take)), -1
