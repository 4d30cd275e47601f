"""MoD weight select on the CPU (or any device) in plain torch, fast: the torch engine's
passes (modkern.ops.select_engine.TorchEngine drives them).

The formula is `where(t1 < v, t1, t2)` with v from `select_threshold` (see
select_reference.py for why that is exact). The work is arranged around memory traffic;
every pass is one vectorized torch op over t1's raw bits, never a float32 copy:

1. `minmax`: t1's global min and max (one read) and, out of place, a plain copy of t1
   into the output (one read, one write);
2. `hot_blocks`: the maximum of every 4096-element block, taken on t1's bits viewed as
   integers (for v > 0 the integer order of the bits is the float order: one fast read);
   then `selected_chunks`: in the few blocks that reach v, the elements to take, a bounded
   group of blocks at a time. Model 2 is then read at just those elements (see
   select_source.take_at). At alpha 0.9 about 1e-5 of the elements come from t2, so t2 is
   barely touched.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .select_reference import INT_OF_SIZE

BLOCK = 4096

HOT_GROUP = 256  # blocks whose selected elements are gathered per step (bounds memory)
# Up to this many elements, evaluating the formula itself costs less than the threshold
# search (about 0.3 ms of small torch ops): norms and biases take that path.
DIRECT_MAX = 1 << 14


def minmax(src: torch.Tensor, copy_to: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of the contiguous 1-D `src`, each as a 1-element tensor of its dtype,
    copying src into `copy_to` when given."""
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
    r, c = torch.nonzero(rows >= v, as_tuple=True)
    idx = whole[r] * BLOCK + c
    if blocks.numel() and int(blocks[-1]) == n_full:  # the ragged last block
        tail = torch.nonzero(flat[n_full * BLOCK:] >= v).flatten() + n_full * BLOCK
        idx = torch.cat([idx, tail])
    return idx
