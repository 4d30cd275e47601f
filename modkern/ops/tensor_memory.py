"""Where a tensor's elements lie in memory, for merges that write into the caller's tensors:
which tensors are one view of one memory, which overlap, and whether a tensor's own
elements share memory (an expanded, stride-0 view cannot be written element by element).

Also `write_mode`: merges are data updates, not differentiable operations. They run under
`torch.no_grad()` (so an in-place merge into a Parameter works like an optimizer step, and
an out-of-place result is a plain tensor), or under `torch.inference_mode()` when a tensor
to be written was made in inference mode (torch allows no other in-place update of it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def view_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when they are one view of one memory (same storage,
    offset, shape and strides): writing one writes the other element for element."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def memory_span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of the memory t's elements can touch (a
    superset of it for strided views); an empty tensor touches no byte (end == first)."""
    lo = t.storage_offset() * t.element_size()
    if t.numel() == 0:
        return t.untyped_storage().data_ptr(), lo, lo
    reach = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return t.untyped_storage().data_ptr(), lo, lo + reach * t.element_size()


def spans_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two `memory_span`s share a byte."""
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may share an element's memory (conservative for interleaved views:
    two disjoint slices of every other element count as sharing)."""
    return spans_overlap(memory_span(a), memory_span(b))


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of t share one memory location (an expanded or stride-0 view,
    or an as_strided view whose steps overlap): such a tensor cannot be written in place."""
    dims = sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1)
    if t.numel() <= 1 or not dims:
        return False
    if dims[0][0] == 0:
        return True
    reach = 0
    for step, n in dims:  # each step beyond all the smaller ones: every element its own
        if step <= reach:
            break
        reach += step * (n - 1)
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)  # an unusual layout: count the addresses
    for n, st in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n) * st
    return torch.unique(offsets).numel() < t.numel()


def write_mode(written: Iterable[torch.Tensor]):
    """The autograd mode a merge runs in, given the caller's tensors it writes into:
    inference mode when one of them is an inference tensor, else no_grad."""
    if not torch.is_inference_mode_enabled() and any(
            isinstance(t, torch.Tensor) and t.is_inference() for t in written):
        return torch.inference_mode()
    return torch.no_grad()
