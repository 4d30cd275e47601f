"""MoD weight select on the CPU (or any device) in plain torch, fast.

The formula is `where(t1 < v, t1, t2)` with v from `select_threshold` (see
select_reference.py for why that is exact). The work is arranged around memory traffic;
every pass is one vectorized torch op over t1's raw bits, never a float32 copy:

1. `minmax`: t1's global min and max (one read) and, out of place, a plain copy of t1
   into the output (one read, one write);
2. `patch_selected`: the maximum of every 4096-element block, taken on t1's bits viewed as
   integers (for v > 0 the integer order of the bits is the float order: one fast read),
   then, in the few blocks that reach v, the elements to take, and a gather of t2 at just
   those elements. At alpha 0.9 about 1e-5 of the elements come from t2, so t2 is
   barely touched.
"""

from __future__ import annotations

import torch

from .select_reference import INT_OF_SIZE

BLOCK = 4096

HOT_GROUP = 256  # blocks patched per step
# Up to this many elements, evaluating the formula itself costs less than the threshold
# search (about 0.3 ms of small torch ops): norms and biases take that path.
DIRECT_MAX = 1 << 14



def minmax(src: torch.Tensor, copy_to: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of the contiguous 1-D `src`, each as a 1-element tensor of its dtype,
    copying src into `copy_to` when given. (The Triton engine returns per-block values;
    callers reduce either with .min()/.max().)"""
    lo, hi = torch.aminmax(src)
    if copy_to is not None:
        copy_to.copy_(src)
    return lo.reshape(1), hi.reshape(1)


def hot_blocks(flat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Indices of the BLOCK-sized blocks of `flat` that hold an element >= v."""
    n = flat.numel()
    full = n // BLOCK * BLOCK
    if bool(v > 0):
        # Finite floats and their bits share one order on the non-negative side, and every
        # negative float's bits are negative integers: for v > 0, x >= v <=> bits(x) >= bits(v).
        as_int = INT_OF_SIZE[flat.element_size()]
        bits, threshold = flat.view(as_int), v.reshape(1).view(as_int)
    else:
        bits, threshold = flat, v.reshape(1)
    maxima = bits[:full].view(-1, BLOCK).amax(dim=1)
    if full < n:
        maxima = torch.cat([maxima, bits[full:].amax().reshape(1)])
    return torch.nonzero(maxima >= threshold).flatten()


def patch_selected(dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor,
                   block_max: torch.Tensor | None = None,
                   atomic: bool = False) -> tuple[int, int]:
    """Overwrite, in the contiguous 1-D `dst` (holding t1's values), every element >= v with
    t2's element at the same flat index, reading only the blocks that hold one.

    t2 may be any tensor with dst's number of elements (strided, another dtype): it is only
    gathered at the selected indices. A non-finite selected t2 element stops the patch;
    with `atomic` (for in-place merges into the caller's t1) nothing at all is written
    then. `block_max` is unused here (the Triton engine's interface). Returns (elements
    taken, flat index of the first non-finite selected t2 element or -1)."""
    v = v.reshape(1).to(dst.dtype)
    groups = hot_blocks(dst, v).split(HOT_GROUP)  # bounds memory when much is taken
    if atomic and len(groups) > 1:  # one group is checked before it is written anyway
        for group in groups:
            _, bad = patch_indices(dst, t2, selected_in_blocks(dst, v, group), write=False)
            if bad >= 0:
                return 0, bad
    taken = 0
    for group in groups:
        n, bad = patch_indices(dst, t2, selected_in_blocks(dst, v, group))
        taken += n
        if bad >= 0:
            return taken, bad
    return taken, -1


def patch_indices(dst: torch.Tensor, t2: torch.Tensor, idx: torch.Tensor,
                  write: bool = True) -> tuple[int, int]:
    """Copy t2's elements at the flat indices `idx` into the 1-D `dst` (if `write`), after
    checking they all are finite. Returns (elements taken, first non-finite index or -1); with a
    non-finite element nothing is written."""
    vals = gather_flat(t2, idx).to(dst.dtype)
    finite = torch.isfinite(vals)
    if not bool(finite.all()):
        return 0, int(idx[~finite][0])
    if write:
        dst[idx] = vals
    return idx.numel(), -1


def selected_indices(flat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices of the elements of the contiguous 1-D `flat` that are >= v,
    found block-wise as `patch_selected` finds them (the checkpoint merge reads OTHER at
    exactly these)."""
    v = v.reshape(1).to(flat.dtype)
    parts = [selected_in_blocks(flat, v, group)
             for group in hot_blocks(flat, v).split(HOT_GROUP)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=flat.device)


def selected_in_blocks(flat: torch.Tensor, v: torch.Tensor,
                       blocks: torch.Tensor) -> torch.Tensor:
    """Flat indices of the elements >= v inside the given (sorted) blocks of `flat`."""
    n_full = flat.numel() // BLOCK
    whole = blocks[blocks < n_full]
    rows = flat[:n_full * BLOCK].view(-1, BLOCK).index_select(0, whole)
    r, c = torch.nonzero(rows >= v, as_tuple=True)
    idx = whole[r] * BLOCK + c
    if blocks.numel() and int(blocks[-1]) == n_full:  # the ragged last block
        tail = torch.nonzero(flat[n_full * BLOCK:] >= v).flatten() + n_full * BLOCK
        idx = torch.cat([idx, tail])
    return idx


def gather_flat(t: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """t's elements at row-major flat indices, without copying a strided t."""
    if t.is_contiguous():
        return t.view(-1)[flat_idx]
    return t[torch.unravel_index(flat_idx, t.shape)]
