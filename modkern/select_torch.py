"""MoD weight select on the CPU (or any device) in plain torch, fast.

The formula is `where(t1 < v, t1, t2)` with v from `select_threshold` (see
select_reference.py for why that is exact). The work is arranged around memory traffic:

- pass 1 walks t1 in cache-sized chunks, taking each chunk's min and max and, out of place,
  copying the chunk to the output while it is still in cache (one read of t1, one write);
- pass 2 visits only the chunks whose own max reaches v and patches the few elements that
  come from t2 (at alpha 0.9 about 1e-5 of them), reading t2 only there.

So an out-of-place select moves about 2 bytes per element byte and an in-place one about 1,
against 4 or more for the formula evaluated op by op. No float32 copy of t1 is ever made.
"""

from __future__ import annotations

import torch

from .select_reference import select_threshold

# Elements per chunk: large enough that per-chunk Python overhead is negligible, small
# enough that a chunk read for min/max is still in cache when it is copied.
CHUNK = 1 << 18


def chunk_minmax(flat: torch.Tensor, copy_to: torch.Tensor | None = None,
                 chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk (min, max) of a contiguous 1-D tensor, optionally copying it to `copy_to`
    chunk by chunk. Returns two 1-D tensors of flat's dtype, one entry per chunk."""
    n = flat.numel()
    mins, maxs = [], []
    for start in range(0, n, chunk):
        part = flat[start:start + chunk]
        lo, hi = torch.aminmax(part)
        mins.append(lo)
        maxs.append(hi)
        if copy_to is not None:
            copy_to[start:start + chunk].copy_(part)
    return torch.stack(mins), torch.stack(maxs)


def patch_selected(dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor,
                   chunk_max: torch.Tensor, chunk: int = CHUNK,
                   write: bool = True) -> tuple[int, int]:
    """Overwrite, in the contiguous 1-D `dst` (holding t1's values), every element >= v with
    t2's element at the same flat index. Only chunks whose max reaches v are read again.

    t2 may be any tensor with dst's number of elements (strided, another dtype): it is only
    gathered at the selected indices. Stops at the first selected t2 element that is not
    finite. `write=False` only scans (to validate before an in-place merge touches t1).
    Returns (elements taken, flat index of the first non-finite selected t2 element or -1)."""
    taken = 0
    for c in torch.nonzero(chunk_max >= v).flatten().tolist():
        start = c * chunk
        part = dst[start:start + chunk]
        idx = torch.nonzero(part >= v).flatten()
        if idx.numel() == 0:
            continue
        vals = gather_flat(t2, idx + start).to(dst.dtype)
        finite = torch.isfinite(vals)
        if not bool(finite.all()):
            return taken, int(idx[~finite][0]) + start
        if write:
            part[idx] = vals
        taken += idx.numel()
    return taken, -1


def gather_flat(t: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """t's elements at row-major flat indices, without copying a strided t."""
    if t.is_contiguous():
        return t.view(-1)[flat_idx]
    return t[torch.unravel_index(flat_idx, t.shape)]
