"""The index behind a sweep over alpha (docs/design.md 1.3): the elements of t1 at or above the
lowest of a tensor's thresholds, grouped by the interval between consecutive thresholds.

For sorted distinct thresholds u_0 < u_1 < ... < u_{m-1} (each the exact threshold
`select_threshold` gives for one alpha), group j holds the flat indices of the elements x
of t1 with u_j <= x < u_{j+1} (the last group: x >= u_{m-1}), ascending. The select at
threshold u_j takes exactly groups j..m-1, so going from u_j to u_k touches only the groups
between j and k: the elements that change.

Everything works on t1's raw bits (`at_or_above` compares them with a threshold's ordered
key), so no float is converted. One pass over t1 finds the elements at or
above u_0; the further thresholds number the groups of those elements, and one pass per
group picks its elements. A tensor is processed in chunks of CHUNK elements, so the
temporaries stay bounded whatever its size; each group is kept as one piece per chunk.

On the CPU the passes run in numpy on zero-copy views of the tensors' bits (numpy's
flatnonzero and take are several times faster than torch's CPU ops here); on other devices
the same code runs with torch ops (`ArrayOps.for_tensor`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .select_reference import INT_OF_SIZE, to_ordered

CHUNK = 1 << 20  # elements of t1 grouped at a time: the temporaries stay in cache


class ArrayOps:
    """The few array operations the grouping needs, on numpy arrays (CPU tensors) or on
    torch tensors (any device); the rest (comparisons, `~`, `&`, slicing, fancy indexing)
    is written with operators both share."""

    def __init__(self, device: torch.device | str = "cpu", use_numpy: bool | None = None):
        self.device = torch.device(device)
        self.numpy = self.device.type == "cpu" if use_numpy is None else use_numpy

    @staticmethod
    def for_tensor(t: torch.Tensor) -> "ArrayOps":
        """The operations for a tensor on t's device (numpy on the CPU)."""
        return ArrayOps(t.device)

    def bits(self, t: torch.Tensor):
        """The raw bits of the contiguous tensor t as signed integers of its width: a view
        (writes go through to t)."""
        ints = t.view(INT_OF_SIZE[t.element_size()])
        return ints.numpy() if self.numpy else ints

    def flatnonzero(self, mask):
        """Positions of the True elements of a 1-D mask, ascending (int64)."""
        if self.numpy:
            return np.flatnonzero(mask)
        return torch.nonzero(mask).flatten()

    def take(self, a, index):
        """a[index] (numpy's take is faster than its fancy indexing)."""
        return np.take(a, index) if self.numpy else a[index]

    def zeros(self, n: int, small: bool):
        """n zero counters: uint8 when `small`, else int32."""
        if self.numpy:
            return np.zeros(n, np.uint8 if small else np.int32)
        return torch.zeros(n, dtype=torch.uint8 if small else torch.int32, device=self.device)

    def compact(self, index, small: bool):
        """Flat indices as stored: int32 when the tensor has fewer than 2**31 elements."""
        if not small:
            return index
        return index.astype(np.int32) if self.numpy else index.to(torch.int32)

    def wide(self, index):
        """Stored indices as int64, as indexing wants them."""
        return index.astype(np.int64) if self.numpy else index.to(torch.int64)

    def to_torch(self, a) -> torch.Tensor:
        """An array of these operations as a torch tensor (numpy: sharing its memory)."""
        return torch.from_numpy(a) if self.numpy else a

    def from_torch(self, t: torch.Tensor):
        """A CPU torch tensor as an array of these operations (numpy: sharing its memory)."""
        return t.numpy() if self.numpy else t


def at_or_above(bits, key: int):
    """Mask of the floats (as raw bits) that are >= the float of ordered key `key`, without
    computing keys: above a positive threshold the bits' integer order is the floats'
    order; at or below zero, every non-negative float qualifies (-0.0 included) and a
    negative one when its magnitude is at most the threshold's (negative floats' bits are
    the most negative integer plus their magnitude)."""
    if key > 0:
        return bits >= key
    most_negative = -_max_positive(bits) - 1
    return (bits >= 0) | (bits <= most_negative - key)


def nonfinite(bits, dtype: torch.dtype):
    """Mask of the bit patterns (of `dtype`) that are an infinity or a NaN."""
    return (bits & _max_positive(bits)) >= _inf_bits(dtype)


def _max_positive(bits) -> int:
    width = bits.itemsize if isinstance(bits, np.ndarray) else bits.element_size()
    return (1 << (8 * width - 1)) - 1


def _inf_bits(dtype: torch.dtype) -> int:
    inf = torch.tensor(float("inf"), dtype=dtype)
    return int(inf.view(INT_OF_SIZE[inf.element_size()]))


def threshold_keys(v: torch.Tensor) -> list[int]:
    """Integer keys of thresholds v (a 1-D tensor of t1's dtype, finite or infinite) whose
    order is the floats' order (select_reference.to_ordered: +magnitude or -magnitude, so
    -0.0 and +0.0 both map to 0)."""
    return to_ordered(v.detach().cpu().contiguous()).tolist()


@dataclass
class Piece:
    """One chunk's part of a group: flat indices of t1 (ascending) and model 2's values
    there, as bits of t1's dtype."""

    index: object
    values: object


@dataclass
class Groups:
    """The grouped selection of one tensor (see the module docstring): `pieces[j]` holds
    group j; `sizes[j]` its element count; `first_bad[j]` the smallest flat index in group
    j whose model-2 value is not finite in t1's dtype (None: all finite)."""

    pieces: list[list[Piece]]
    sizes: list[int]
    first_bad: list[int | None] = field(default_factory=list)


# (ascending positions in a chunk, the chunk's first flat index) -> model 2's values there,
# as bits of t1's dtype (arrays of the ArrayOps in use)
Fetch = Callable[[object, int], object]


class Grouping:
    """The grouping of the contiguous 1-D `flat` (t1's values) by the sorted distinct
    threshold keys `keys`, as chunk jobs that may run in any order on any thread
    (`run_groupings` runs the jobs of many tensors together), then `assemble`d.

    Per chunk: one pass finds the elements at or above keys[0] and reads model 2's values
    there with `fetch` (once, ascending); each further threshold adds one to the group
    number of the selected elements at or above it; one pass per group then picks that
    group's elements (ascending)."""

    def __init__(self, flat: torch.Tensor, keys: list[int], fetch: Fetch, ops: ArrayOps):
        self.bits, self.keys, self.fetch, self.ops = ops.bits(flat), keys, fetch, ops
        self.dtype = flat.dtype
        self.starts = range(0, flat.numel(), CHUNK) if keys else range(0)

    def chunk(self, start: int) -> list[tuple[Piece, int | None] | None]:
        return _group_chunk(self.bits, start, self.keys, self.fetch, self.ops, self.dtype)

    def assemble(self, chunks: list[list[tuple[Piece, int | None] | None]]) -> Groups:
        """The groups from the chunks' parts (in chunk order)."""
        m = len(self.keys)
        groups = Groups([[] for _ in range(m)], [0] * m, [None] * m)
        for parts in chunks:
            for j, part in enumerate(parts):
                if part is None:
                    continue
                piece, bad = part
                groups.pieces[j].append(piece)
                groups.sizes[j] += len(piece.index)
                if bad is not None and (groups.first_bad[j] is None or
                                        bad < groups.first_bad[j]):
                    groups.first_bad[j] = bad
        return groups


def run_groupings(groupings: list[Grouping]) -> list[Groups]:
    """Run the chunk jobs of every grouping, on torch's number of threads when all of them
    run in numpy (which releases the GIL in these passes: the chunks of all tensors share
    the threads, large and small alike), and assemble each grouping's groups."""
    jobs = [(g, start) for g in groupings for start in g.starts]
    numpy_only = all(g.ops.numpy for g in groupings)
    workers = min(torch.get_num_threads(), len(jobs)) if numpy_only else 1

    def run(job: tuple[Grouping, int]):
        return job[0].chunk(job[1])

    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="modkern-sweep") as pool:
            parts = list(pool.map(run, jobs))
    else:
        parts = [run(job) for job in jobs]
    out, done = [], 0
    for g in groupings:
        out.append(g.assemble(parts[done:done + len(g.starts)]))
        done += len(g.starts)
    return out


def _group_chunk(bits, start: int, keys: list[int], fetch: Fetch, ops: ArrayOps,
                 dtype: torch.dtype) -> list[tuple[Piece, int | None] | None]:
    """One chunk's part of each group: (piece, smallest flat index in it whose model-2
    value is not finite, or None), or None for a group with no element here."""
    chunk = bits[start:start + CHUNK]
    parts: list[tuple[Piece, int | None] | None] = [None] * len(keys)
    selected = ops.flatnonzero(at_or_above(chunk, keys[0]))
    if len(selected) == 0:
        return parts
    values = fetch(selected, start)
    group_of = group_numbers(ops.take(chunk, selected), keys, ops)
    bad = ops.flatnonzero(nonfinite(values, dtype))
    index = ops.compact(selected, small=len(bits) < 2 ** 31)  # once: the takes move half
    index += start
    for j in range(len(keys)):
        positions = ops.flatnonzero(group_of == j)
        if len(positions) == 0:
            continue
        bad_here = index[bad][group_of[bad] == j] if len(bad) else index[:0]
        parts[j] = (Piece(ops.take(index, positions), ops.take(values, positions)),
                    int(bad_here.min()) if len(bad_here) else None)
    return parts


def group_numbers(selected_bits, keys: list[int], ops: ArrayOps):
    """For the raw bits of elements at or above keys[0], the number of the group each
    falls in: how many of keys[1:] it is at or above."""
    number = ops.zeros(len(selected_bits), small=len(keys) <= 256)
    for key in keys[1:]:
        number += at_or_above(selected_bits, key)
    return number
