"""`merge_state_dicts`: MoD over whole state dicts, with name filters and per-name alpha
(see modkern/merging/patterns.py for the name patterns and alpha rules), each tensor through
the select pipeline (modkern/ops/select_pipeline.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

from ..backends import resolve_backend
from ..checks import check_precision
from ..errors import ModkernError
from ..ops import select_engine
from ..ops.select_context import SelectContext
from ..ops.select_pipeline import SelectResult, select_inplace, select_into, \
    select_packed
from .counts import MergeStats
from .patterns import AlphaRule, Patterns, check_alpha_rule, name_filter
from .plan import alphas, check_keys, names_to_merge

__all__ = ["MergeStats", "merge_state_dicts", "check_keys", "check_shared_storage"]

# Tensors up to this many elements are packed together on the Triton backend (norms,
# biases): one launch pair for all of them instead of one per tensor.
BATCH_MAX = 1 << 16


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
    names = names_to_merge(sd1, sd2, name_filter(include, exclude))
    plan = alphas(check_alpha_rule(alpha, names), names)
    if inplace:
        check_shared_storage(sd1, sd2, plan)
        plan = _first_of_each_storage(sd1, plan)  # tied weights: merge shared storage once
    stats = stats if stats is not None else MergeStats()
    merged_before = stats.tensors_merged
    outputs: dict[str, torch.Tensor] = {}
    batches: dict[tuple, list[str]] = defaultdict(list)
    for name, a in plan.items():
        t1, t2 = sd1[name], sd2[name]
        engine = select_engine.engine_for(resolve_backend(backend, t1, t2))
        if engine.name == "triton" and 0 < t1.numel() <= BATCH_MAX:
            batches[(t1.dtype, t1.device)].append(name)  # small: packed, launched together
            continue
        outputs[name], result = _merge_one(t1, t2, a, precision=precision, engine=engine,
                                           inplace=inplace, name=name)
        stats.add(name, result)
    for names in batches.values():
        outputs |= _merge_packed(sd1, sd2, names, plan, precision, inplace, stats)
    stats.carry(len(sd1) - (stats.tensors_merged - merged_before))
    if inplace:
        return sd1  # type: ignore[return-value]
    return {name: outputs.get(name, t1) for name, t1 in sd1.items()}


def _merge_one(t1: torch.Tensor, t2: torch.Tensor, alpha: float, *, precision: str,
               engine: select_engine.SelectEngine, inplace: bool, name: str
               ) -> tuple[torch.Tensor, SelectResult]:
    """One pair through the select pipeline, into a new tensor or into t1 itself."""
    context = SelectContext(name)
    if inplace:
        return t1, select_inplace(t1, t2, alpha, precision=precision, engine=engine,
                                  context=context)
    out = torch.empty(t1.shape, dtype=t1.dtype, device=t1.device)
    return out, select_into(out, t1, t2, alpha, precision=precision, engine=engine,
                            context=context)


def _merge_packed(sd1, sd2, names: list[str], plan: dict[str, float], precision: str,
                  inplace: bool, stats: MergeStats) -> dict[str, torch.Tensor]:
    """Small tensors of one dtype and device, packed into one launch pair (Triton)."""
    t1s = [sd1[n] for n in names]
    outs = t1s if inplace else [torch.empty_like(t, memory_format=torch.contiguous_format)
                                for t in t1s]
    results = select_packed(outs, t1s, [sd2[n] for n in names], [plan[n] for n in names],
                            precision=precision, engine=select_engine.engine_for("triton"),
                            contexts=[SelectContext(n) for n in names])
    for name, result in zip(names, results):
        stats.add(name, result)
    return dict(zip(names, outs))


def _first_of_each_storage(sd1: Mapping[str, torch.Tensor],
                           plan: dict[str, float]) -> dict[str, float]:
    """The plan without tensors that are views of a storage merged before (tied weights
    such as embed_tokens and lm_head): merging those in place a second time would apply
    the select to already merged values."""
    seen: set[tuple] = set()
    kept = {}
    for name, a in plan.items():
        key = storage_key(sd1[name])
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
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for name, a in plan.items():
        t1 = sd1[name]
        if t1.numel() == 0:
            continue
        key = storage_key(t1)
        if key in first:
            other = first[key]
            if plan[other] != a or not _same_values(sd2[other], sd2[name]):
                raise ModkernError(
                    f"tensors {other!r} and {name!r} share memory in model 1 (base) (tied "
                    "weights) but model 2 (other) or their alpha differ, so they cannot be "
                    f"merged in place into one tensor; {remedy}")
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
                    f"already merged; {remedy}")
        spans.setdefault(ptr, []).append((lo, hi, name))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or storage_key(a) == storage_key(b) or (
        a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b)))


def storage_key(t: torch.Tensor) -> tuple:
    """Tensors with one key are the same view of one memory (tied weights)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
