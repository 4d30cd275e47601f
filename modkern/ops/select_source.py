"""Model 2's values, where the select takes them: from a tensor, or from a reader that
reads only the elements asked for (a checkpoint file), and `take_at`, the step that reads
them at the selected indices, checks they are finite and writes them.

A source answers `read(flat_idx)` for indices of the part being merged (a whole tensor, or
a row block of one starting at flat index `first` of the tensor). A source whose values
lie in a tensor on the merge's device also offers it as `tensor`, so an engine can read
them in the same pass that finds what to take (the fused patch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch

from .select_torch import nonfinite


class ValueSource(Protocol):
    """Where model 2's values of one tensor (or row block) come from."""

    @property
    def tensor(self) -> torch.Tensor | None:
        """Model 2's values as a tensor with the part's number of elements on the merge's
        device, or None when they must be read at indices."""

    def read(self, flat_idx: torch.Tensor) -> torch.Tensor:
        """Model 2's values (as stored: its dtype, any device) at the sorted flat indices
        `flat_idx` of the part."""

    def reads_range(self, taken: int, span: int) -> bool:
        """Whether a range of `span` elements of the part that takes `taken` of them is
        read whole (`read_range`) rather than at its elements (`read`)."""

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Model 2's elements [start, stop) of the part (as stored)."""


def gather_flat(t: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """t's elements at row-major flat indices, without copying a strided t."""
    if t.is_contiguous():
        return t.view(-1)[flat_idx]
    return t[torch.unravel_index(flat_idx, t.shape)]


class TensorSource:
    """Model 2's tensor t2, held in memory (any strides, any float dtype)."""

    def __init__(self, t2: torch.Tensor):
        self.tensor = t2

    def read(self, flat_idx: torch.Tensor) -> torch.Tensor:
        return gather_flat(self.tensor, flat_idx.to(self.tensor.device))

    def reads_range(self, taken: int, span: int) -> bool:
        # a range of a strided t2 would be a copy of all of it: indices then
        return self.tensor.is_contiguous() and dense(taken, span)

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor.view(-1)[start:stop]


# A group of hot blocks is read whole, in one positioned read of the range it spans, when
# it takes at least this fraction of that range's elements; a sparser group is read at its
# elements' pages only. Measured (bench/bench_low_alpha.py, bench/results/cpu_low_alpha.md):
# the range route costs about 5 ns per element of the range, the page route a few hundred
# ns per element taken (its index, its page); they cross between 3e-3 and 3e-2, and from
# 1e-3 on nearly every 4 KB page holds a taken bf16 element anyway, so both read the same
# bytes. At alpha 0.9 on N(0, 0.02) weights about 1e-5 to 1e-4 of the elements are taken:
# the page route, a few % of OTHER's bytes.
DENSE_FRACTION = 1e-2


def dense(taken: int, span: int) -> bool:
    """Whether a range of `span` elements that takes `taken` of them from model 2 is taken
    whole, by masks over the range, rather than at its elements' indices."""
    return taken >= DENSE_FRACTION * span


class ElementReader(Protocol):
    """What a ReaderSource reads from (e.g. checkpoint.safetensors_io.SafetensorsReader)."""

    def read_elements(self, name: str, flat_idx: torch.Tensor) -> torch.Tensor: ...


class ReaderSource:
    """Tensor `name` of a file, read only at the elements asked for; `first` is the flat
    index in that tensor of the part's first element (a row block). How a file is read
    is decided here: `reads_range` says when a range that takes many elements is read
    whole (`read_range`, if the reader has one) rather than at its elements (`read`)."""

    tensor = None

    def __init__(self, reader: ElementReader, name: str, first: int = 0):
        self.reader, self.name, self.first = reader, name, first

    def read(self, flat_idx: torch.Tensor) -> torch.Tensor:
        return self.reader.read_elements(self.name, flat_idx.cpu() + self.first)

    def reads_range(self, taken: int, span: int) -> bool:
        """Whether a range of the part is read whole (one sequential read) rather than at
        its elements' pages: when the reader can and the range is dense."""
        return hasattr(self.reader, "read_range") and dense(taken, span)

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Model 2's elements [start, stop) of the part (as stored), in one read."""
        return self.reader.read_range(self.name, self.first + start, self.first + stop)


def take_at(dst: torch.Tensor, source: ValueSource, chunks: Iterable[torch.Tensor],
            atomic: bool = False) -> tuple[int, int]:
    """Write model 2's values at the selected flat indices (sorted, in chunks) into the
    1-D `dst`, each chunk after checking its values are finite in dst's dtype.

    Stops at the first non-finite value; with `atomic` (an in-place merge into the caller's
    tensor) nothing at all is written then (the values are checked in a first pass when
    there is more than one chunk). Returns (elements taken, flat index of the first
    non-finite value or -1)."""
    if atomic:
        chunks = list(chunks)
        if len(chunks) > 1:
            for idx in chunks:
                _, bad = _take_chunk(dst, source, idx, write=False)
                if bad >= 0:
                    return 0, bad
    taken = 0
    for idx in chunks:
        n, bad = _take_chunk(dst, source, idx, write=True)
        taken += n
        if bad >= 0:
            return taken, bad
    return taken, -1


def _take_chunk(dst: torch.Tensor, source: ValueSource, idx: torch.Tensor,
                write: bool) -> tuple[int, int]:
    vals = source.read(idx).to(device=dst.device, dtype=dst.dtype)
    bad = nonfinite(vals)
    if bool(bad.any()):
        return 0, int(idx[bad.to(idx.device)][0])
    if write:
        dst[idx.to(dst.device)] = vals
    return idx.numel(), -1


def check_at(dst: torch.Tensor, source: ValueSource, chunks: Iterable[torch.Tensor]) -> int:
    """The flat index of the first of model 2's values at the selected flat indices (sorted,
    in chunks) that is not finite in dst's dtype, or -1; nothing is written."""
    for idx in chunks:
        _, bad = _take_chunk(dst, source, idx, write=False)
        if bad >= 0:
            return bad
    return -1

