"""`merge_state_dicts`: MoD over whole state dicts, with name filters and per-name alpha
(see modkern/merging/patterns.py for the name patterns and alpha rules).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..backends import resolve_backend
from ..errors import DTypeError, KeyMismatchError, ModkernError
from ..checks import check_precision
from ..ops.select import SelectResult, check_pair, select_inplace, select_into, \
    select_many_into
from .patterns import AlphaRule, Patterns, alpha_for, check_alpha_rule, name_filter

# Tensors up to this many elements are packed together on the Triton backend (norms,
# biases): one launch pair for all of them instead of one per tensor.
BATCH_MAX = 1 << 16


@dataclass
class MergeStats:
    """Counts a merge fills in when passed as `stats=`."""

    tensors_merged: int = 0
    tensors_carried: int = 0
    elements_merged: int = 0
    elements_taken: int = 0
    taken_by_key: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, result: SelectResult) -> None:
        self.tensors_merged += 1
        self.elements_merged += result.numel
        self.elements_taken += result.taken
        self.taken_by_key[name] = result.taken


def check_keys(sd1: Mapping[str, object], sd2: Mapping[str, object]) -> None:
    """KeyMismatchError naming the keys that only one model has."""
    only1 = [k for k in sd1 if k not in sd2]
    only2 = [k for k in sd2 if k not in sd1]
    if only1 or only2:
        def show(keys: list[str]) -> str:
            return ", ".join(repr(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
        parts = []
        if only1:
            parts.append(f"{len(only1)} key(s) only in model 1 (base): {show(only1)}")
        if only2:
            parts.append(f"{len(only2)} key(s) only in model 2 (other): {show(only2)}")
        raise KeyMismatchError("state dicts differ: " + "; ".join(parts) +
                               " (pass strict=False to carry model 1's extra keys over and "
                               "ignore model 2's)")


def merge_state_dicts(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
                      alpha: AlphaRule, *, include: Patterns = None, exclude: Patterns = None,
                      strict: bool = True, inplace: bool = False, backend: str = "auto",
                      precision: str = "exact",
                      stats: MergeStats | None = None) -> dict[str, torch.Tensor]:
    """Merge two state dicts by MoD (DESIGN.md 1.1), tensor by tensor.

    Every floating-point tensor present in both dicts and selected by the name filters is
    replaced by `mod_select(sd1[k], sd2[k], alpha_k)`; every other entry of sd1 is carried
    over unchanged. The result has sd1's keys, order, shapes and dtypes.

    Args:
        sd1: the base model's state dict (model 1).
        sd2: the other model's state dict (model 2).
        alpha: a float in [0, 1]; or a mapping from name patterns to floats (first match
            wins, e.g. `{"layers.0.": 0.8, "*": 0.9}`); or a function of the name returning
            a float, or None to carry that tensor over unmerged.
        include: patterns a name must match to be merged (e.g. "mlp", as the paper did).
        exclude: patterns that keep a name out of the merge.
        strict: raise KeyMismatchError if the dicts' keys differ; if False, model 1's extra
            keys are carried over and model 2's are ignored.
        inplace: overwrite sd1's tensors (the cheapest merge) and return sd1 itself.
        backend, precision: as for `mod_select`.
        stats: a MergeStats to fill with counts (tensors merged, elements taken).

    Errors name the key and the model (see modkern.errors); nothing in sd1 is modified by a
    merge that raises on a tensor's validation, except tensors already merged in place.
    """
    check_precision(precision)
    if strict:
        check_keys(sd1, sd2)
    plan = _plan(sd1, sd2, alpha, name_filter(include, exclude))  # names key and pattern
    check_alpha_rule(alpha)  # then the values no tensor matched, still before any work
    if inplace:
        check_shared_storage(sd1, sd2, plan)
        plan = _first_of_each_storage(sd1, plan)  # tied weights: merge shared storage once
    stats = stats if stats is not None else MergeStats()
    outputs: dict[str, torch.Tensor] = {}
    batches: dict[tuple, list[str]] = defaultdict(list)
    for name, a in plan.items():
        t1, t2 = sd1[name], sd2[name]
        backend_k = resolve_backend(backend, t1, t2)
        if backend_k == "triton" and 0 < t1.numel() <= BATCH_MAX:
            batches[(t1.dtype, t1.device)].append(name)  # small: packed, launched together
            continue
        if inplace:
            stats.add(name, select_inplace(t1, t2, a, precision=precision, backend=backend_k,
                                           name=name))
        else:
            outputs[name] = torch.empty(t1.shape, dtype=t1.dtype, device=t1.device)
            stats.add(name, select_into(outputs[name], t1, t2, a, precision=precision,
                                        backend=backend_k, name=name))
    for names in batches.values():
        t1s = [sd1[n] for n in names]
        outs = t1s if inplace else [torch.empty_like(t, memory_format=torch.contiguous_format)
                                    for t in t1s]
        results = select_many_into(outs, t1s, [sd2[n] for n in names],
                                   [plan[n] for n in names], precision=precision, names=names)
        for name, out, res in zip(names, outs, results):
            outputs[name] = out
            stats.add(name, res)
    stats.tensors_carried = len(sd1) - stats.tensors_merged
    if inplace:
        return sd1  # type: ignore[return-value]
    return {name: outputs.get(name, t1) for name, t1 in sd1.items()}


def _first_of_each_storage(sd1: Mapping[str, torch.Tensor],
                           plan: dict[str, float]) -> dict[str, float]:
    """The plan without tensors that are views of a storage merged before (tied weights
    such as embed_tokens and lm_head): merging those in place a second time would apply
    the select to already merged values."""
    seen: set[tuple] = set()
    kept = {}
    for name, a in plan.items():
        key = _storage_key(sd1[name])
        if key not in seen:
            seen.add(key)
            kept[name] = a
    return kept


def check_shared_storage(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
                         plan: Mapping[str, float]) -> None:
    """Before an in-place merge: sd1 tensors that share memory must be exactly tied (one
    view, merged once) with one alpha and equal model-2 tensors, or the in-place result
    could not equal the out-of-place one (a second view would be merged from values already
    merged). Raise ModkernError naming both keys otherwise."""
    first: dict[tuple, str] = {}
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for name, a in plan.items():
        t1 = sd1[name]
        if t1.numel() == 0:
            continue
        key = _storage_key(t1)
        if key in first:
            other = first[key]
            if plan[other] != a or not _same_values(sd2[other], sd2[name]):
                raise ModkernError(
                    f"tensors {other!r} and {name!r} share memory in model 1 (base) (tied "
                    "weights) but model 2 (other) or their alpha differ, so they cannot be "
                    "merged in place into one tensor; merge with inplace=False")
            continue
        first[key] = name
        lo = t1.storage_offset() * t1.element_size()
        hi = lo + (1 + sum((n - 1) * st for n, st in zip(t1.shape, t1.stride()))) \
            * t1.element_size()
        ptr = t1.untyped_storage().data_ptr()
        for start, end, other in spans.get(ptr, []):
            if lo < end and start < hi:
                raise ModkernError(
                    f"tensors {other!r} and {name!r} overlap in memory in model 1 (base) as "
                    "different views; an in-place merge would merge the second from values "
                    "already merged; merge with inplace=False")
        spans.setdefault(ptr, []).append((lo, hi, name))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or _storage_key(a) == _storage_key(b) or (
        a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b)))


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _plan(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
          alpha: AlphaRule, keep: Callable[[str], bool]) -> dict[str, float]:
    """Validate every pair up front (so a bad key fails before any work) and return the
    alpha of each tensor to merge."""
    plan: dict[str, float] = {}
    for name, t1 in sd1.items():
        if name not in sd2 or not keep(name):
            continue
        if not isinstance(t1, torch.Tensor) or not t1.is_floating_point():
            t2 = sd2[name]
            if isinstance(t2, torch.Tensor) and isinstance(t1, torch.Tensor) and \
                    t2.is_floating_point():
                raise DTypeError(f"tensor {name!r}: model 1 (base) has dtype {t1.dtype} but "
                                 f"model 2 (other) has {t2.dtype}; expected both floating "
                                 "point or both not")
            continue
        check_pair(t1, sd2[name], name)
        a = alpha_for(alpha, name)
        if a is not None:
            plan[name] = a
    return plan

