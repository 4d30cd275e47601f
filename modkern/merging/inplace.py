"""`merge_state_dicts(inplace=True)`: the merge written into model 1's own tensors, all or
nothing.

Memory that model 1's tensors share is resolved first: exactly tied weights (embed_tokens
and lm_head as one tensor) are merged once; other sharing that an in-place merge cannot
reproduce is refused. A model-2 tensor that shares memory with a model-1 tensor the merge
writes is read from a copy taken before any write. Then two phases:

1. check: every tensor's select is run without writing (t1's min and max, model 2's values
   where they are taken, all finite); small tensors packed on the Triton backend are
   merged into buffers of their own;
2. write: each tensor is merged in place (the packed ones copied from their buffers).

So a merge that raises leaves model 1 untouched. The cost of that promise: t1 is read
twice (and model 2's selected elements), and memory holds the packed small tensors' results
(at most BATCH_MAX elements each) and the copies of model-2 tensors that share memory with
model 1; with one tensor to merge, the check phase is skipped (its select checks before it
writes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import ModkernError
from ..ops.select_pipeline import check_select, select_inplace
from ..ops.tensor_memory import memory_span, spans_overlap, view_key
from .counts import MergeStats
from .units import Unit, batches, run_batch


def merge_inplace(units: list[Unit], precision: str, stats: MergeStats) -> None:
    """Merge every unit into its t1 (see the module docstring), counting in `stats`."""
    for u in units:
        u.context.check_writable(u.t1, "model 1 (base)")
    read_copies(units)
    groups = batches(units)
    singles = [u for u in units if not u.packed]
    if len(singles) + len(groups) > 1:
        for u in singles:  # phase 1
            check_select(u.t1, u.t2, u.alpha, precision=precision, engine=u.engine,
                         context=u.context)
    merged = []
    for group in groups:
        temps = [torch.empty(u.t1.shape, dtype=u.t1.dtype, device=u.t1.device) for u in group]
        merged.append((group, temps, run_batch(group, temps, precision)))
    for u in singles:  # phase 2
        stats.add(u.name, select_inplace(u.t1, u.t2, u.alpha, precision=precision,
                                         engine=u.engine, context=u.context))
    for group, temps, results in merged:
        torch._foreach_copy_([u.t1 for u in group], temps)
        for u, result in zip(group, results):
            stats.add(u.name, result)


def read_copies(units: list[Unit]) -> None:
    """Give each unit whose t2 shares memory with a t1 the merge writes (another unit's,
    or its own as a different view) a copy of t2, taken now, before any write."""
    written: dict[int, list[tuple[tuple, Unit]]] = {}
    for u in units:
        span = memory_span(u.t1)
        written.setdefault(span[0], []).append((span, u))
    for u in units:
        span = memory_span(u.t2)
        if any(spans_overlap(span, other) and (w is not u or view_key(u.t1) != view_key(u.t2))
               for other, w in written.get(span[0], [])):
            u.t2 = u.t2.clone()


def first_of_each_storage(sd1: Mapping[str, torch.Tensor],
                          plan: dict[str, float]) -> dict[str, float]:
    """The plan without tensors that are views of a storage merged before (tied weights
    such as embed_tokens and lm_head): merging those in place a second time would apply
    the select to already merged values."""
    seen: set[tuple] = set()
    kept = {}
    for name, a in plan.items():
        key = view_key(sd1[name])
        if key not in seen:
            seen.add(key)
            kept[name] = a
    return kept


def check_shared_storage(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
                         plan: Mapping[str, float],
                         remedy: str = "merge with inplace=False") -> None:
    """Before an in-place merge: sd1 tensors that share memory must be exactly tied (one
    view, merged once) with one alpha and equal model-2 tensors, or the in-place result
    could not equal the out-of-place one (a second view would be merged from values already
    merged). Raise ModkernError naming both keys and ending with `remedy` otherwise."""
    first: dict[tuple, str] = {}
    spans: dict[int, list[tuple[tuple, str]]] = {}
    for name, a in plan.items():
        t1 = sd1[name]
        if t1.numel() == 0:
            continue
        key = view_key(t1)
        if key in first:
            other = first[key]
            if plan[other] != a or not _same_values(sd2[other], sd2[name]):
                raise ModkernError(
                    f"tensors {other!r} and {name!r} share memory in model 1 (base) (tied "
                    "weights) but model 2 (other) or their alpha differ, so they cannot be "
                    f"merged in place into one tensor; {remedy}")
            continue
        first[key] = name
        span = memory_span(t1)
        for other_span, other in spans.get(span[0], []):
            if spans_overlap(span, other_span):
                raise ModkernError(
                    f"tensors {other!r} and {name!r} overlap in memory in model 1 (base) as "
                    "different views; an in-place merge would merge the second from values "
                    f"already merged; {remedy}")
        spans.setdefault(span[0], []).append((span, name))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or view_key(a) == view_key(b) or (
        a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b)))
