"""The engines that run the passes of the weight select, behind one protocol.

The select pipeline (select_pipeline.py) asks an engine for: the min and the per-block max
of t1 (copying t1 to the output on the way, out of place), the fused patch (take model 2's
elements where `t1 >= v`, reading model 2 from a tensor in the same pass), and, for
sources read from a file, the hot blocks in groups, each with its count of elements to
take and, on demand, their sorted indices (`groups`; `selected` gives just the indices).
`TorchEngine` runs vectorized torch ops (select_torch.py); `TritonEngine` runs the kernels
of kernels/mod_select.py (the indices compacted on the device), and also packs many small
tensors into one launch pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache, partial
from typing import Literal, Protocol

import torch

from ..backends import kernel_module
from . import select_torch
from .select_source import TensorSource, take_at
from .select_torch import HotGroup


class SelectEngine(Protocol):
    """One way to run the select's passes over a contiguous 1-D tensor."""

    name: Literal["torch", "triton"]
    # True when `patch` reads model 2 from a tensor in its own pass over the hot blocks (a
    # kernel); False: the pipeline takes a tensor's values group by group, as a file's
    fused_patch: bool

    @property
    def direct_max(self) -> int:
        """Up to this many elements the pipeline evaluates the formula itself instead of
        searching for the threshold (0: never)."""

    def minmax(self, src: torch.Tensor, copy_to: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mins, block_max) of `src` in its dtype: the min of each of some consecutive
        parts of src (per block, or per larger chunk: only their min is used) and the max
        of each BLOCK-sized block, the last one ragged (what `patch`, `selected` and
        `groups` take as `block_max`); copies src into `copy_to` when given. A NaN in src
        shows as a NaN in `mins` or in its block's max (callers check both); the maxima of
        blocks without NaN are exact."""

    def patch(self, dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor,
              block_max: torch.Tensor, atomic: bool = False) -> tuple[int, int]:
        """Write t2's elements (any float dtype, dst's size and device) into `dst` (holding
        t1) wherever dst >= v, skipping blocks whose max is below v; a non-finite one is
        never written (with `atomic` nothing is, then). Returns (elements taken, flat index
        of the first non-finite selected t2 element or -1)."""

    def selected(self, flat: torch.Tensor, v: torch.Tensor, block_max: torch.Tensor
                 ) -> Iterator[torch.Tensor]:
        """The sorted flat indices (on flat's device) of the elements >= v, in bounded
        chunks, found from `block_max` (what `minmax` returned)."""

    def groups(self, flat: torch.Tensor, v: torch.Tensor, block_max: torch.Tensor
               ) -> Iterator[HotGroup]:
        """The blocks holding elements >= v, in the groups of select_torch.hot_group_sizes
        (the same on every engine), each with its count; the indices on demand."""

    def patch_range(self, dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor,
                    block_max: torch.Tensor) -> tuple[int, int]:
        """`patch` (not atomic) for a range that takes many of its elements: t2 holds
        model 2's values of the whole range (on dst's device)."""


class PackedEngine(SelectEngine, Protocol):
    """An engine that also runs many small tensors packed end to end in one launch pair:
    `minmax` and `patch` then take the `table` that `pack` built (v then holds one value
    per tensor, and `patch` returns one count taken per tensor)."""

    def pack(self, sizes: list[int], device: torch.device) -> object:
        """The block table of tensors of `sizes` elements packed end to end."""

    def minmax(self, src: torch.Tensor, copy_to: torch.Tensor | None = None,
               table: object | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def patch(self, dst: torch.Tensor, t2: torch.Tensor, v: torch.Tensor,
              block_max: torch.Tensor, atomic: bool = False, table: object | None = None
              ) -> tuple[int | list[int], int]: ...


class TorchEngine:
    """Vectorized torch ops (any device)."""

    name = "torch"
    fused_patch = False

    @property
    def direct_max(self) -> int:
        return select_torch.DIRECT_MAX  # read at call time (tests switch it off)

    def minmax(self, src, copy_to=None):
        return select_torch.minmax(src, copy_to)

    def patch(self, dst, t2, v, block_max, atomic=False):
        return take_at(dst, TensorSource(t2), self.selected(dst, v, block_max), atomic)

    def selected(self, flat, v, block_max):
        v = v.reshape(1).to(flat.dtype)
        return select_torch.selected_chunks(flat, v, select_torch.hot_blocks(block_max, v))

    def groups(self, flat, v, block_max):
        v = v.reshape(1).to(flat.dtype)
        hot = select_torch.hot_blocks(block_max, v)
        for blocks in hot.split(select_torch.hot_group_sizes(hot)):
            yield select_torch.hot_group(flat, v, blocks)

    def patch_range(self, dst, t2, v, block_max):
        return select_torch.patch_where(dst, t2, v)


class TritonEngine:
    """The kernels of kernels/mod_select.py (CUDA tensors, or the CPU under
    TRITON_INTERPRET=1)."""

    name = "triton"
    fused_patch = True
    direct_max = 0

    def __init__(self):
        self.kernels = kernel_module("mod_select")
        # `groups` groups the hot blocks as the torch engine does (select_torch), so a file
        # is read the same way on both engines.
        assert self.kernels.BLOCK == select_torch.BLOCK

    def pack(self, sizes: list[int], device: torch.device):
        return self.kernels.BlockTable(sizes, device)

    def minmax(self, src, copy_to=None, table=None):
        return self.kernels.minmax(src, copy_to=copy_to, table=table)

    def patch(self, dst, t2, v, block_max, atomic=False, table=None):
        if table is None and any(st == 0 and n > 1 for n, st in zip(t2.shape, t2.stride())):
            # expanded (stride 0): read where selected rather than materialize it whole
            return take_at(dst, TensorSource(t2), self.selected(dst, v, block_max), atomic)
        t2 = t2 if t2.is_contiguous() else t2.contiguous()  # the kernel reads t2 flat
        return self.kernels.patch(dst, t2, v, block_max, atomic=atomic, table=table)

    def selected(self, flat, v, block_max):
        return (group.indices() for group in self.groups(flat, v, block_max))

    def groups(self, flat, v, block_max):
        # Compaction on the device: each block's count (blocks below v are not read), an
        # exclusive scan of the hot blocks' counts (their offsets), then per group one
        # launch that writes each block's indices at its offset. The host learns only the
        # hot blocks and their counts (one copy), to group them and size the outputs.
        n, kernels = flat.numel(), self.kernels
        counts = kernels.count_selected(flat, v, block_max)
        hot = torch.nonzero(counts).flatten()
        hot_counts = counts[hot]
        offsets = torch.cumsum(hot_counts, 0) - hot_counts
        hot_host, counts_host = torch.stack([hot, hot_counts]).cpu()
        ends = torch.cumsum(counts_host, 0).tolist()
        first = 0
        for size in select_torch.hot_group_sizes(hot_host):
            last = first + size - 1
            b0, b1 = int(hot_host[first]), int(hot_host[last]) + 1
            total = ends[last] - (ends[first - 1] if first else 0)
            emit = partial(kernels.emit_selected, flat, v, block_max, hot[first:last + 1],
                           offsets[first:last + 1] - offsets[first], total)
            yield HotGroup(b0, b1, b0 * kernels.BLOCK, min(b1 * kernels.BLOCK, n), total,
                           emit)
            first = last + 1

    def patch_range(self, dst, t2, v, block_max):
        return self.patch(dst, t2, v, block_max)


@cache
def engine_for(backend: Literal["torch", "triton"]) -> SelectEngine:
    """The engine of a resolved backend (see backends.resolve_backend)."""
    return TritonEngine() if backend == "triton" else TorchEngine()
