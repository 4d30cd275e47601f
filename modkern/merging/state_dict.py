"""`merge_state_dicts`: MoD over whole state dicts, with name filters and per-name alpha
(see modkern/merging/patterns.py for the name patterns and alpha rules), each tensor through
the select pipeline (modkern/ops/select_pipeline.py); in place through inplace.py, which
writes nothing until every tensor is checked.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..checks import check_precision, check_vocab
from ..errors import OptionError
from ..ops.tensor_memory import write_mode
from .counts import MergeStats
from .inplace import check_shared_storage, first_of_each_storage, merge_inplace
from .patterns import AlphaRule, Patterns, check_alpha_rule, name_filter
from .plan import alphas, check_keys, check_state_dicts, names_to_merge
from .units import batches, make_units, run_batch, run_single, with_outputs

__all__ = ["MergeStats", "merge_state_dicts", "check_keys", "check_shared_storage"]


def merge_state_dicts(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
                      alpha: AlphaRule, *, include: Patterns = None, exclude: Patterns = None,
                      strict: bool = True, inplace: bool = False, backend: str = "auto",
                      precision: str = "exact", vocab: str = "strict",
                      stats: MergeStats | None = None) -> dict[str, torch.Tensor]:
    """Merge two state dicts by MoD (docs/design.md 1.1), tensor by tensor.

    Every floating-point tensor present in both dicts and selected by the name filters is
    replaced by `mod_select(sd1[k], sd2[k], alpha_k)`; every other entry of sd1 is carried
    over unchanged (the same object). The result has sd1's keys, order, shapes and dtypes.

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
        inplace: overwrite sd1's tensors (the cheapest merge) and return sd1 itself. All or
            nothing: every tensor is checked before any is written (see inplace.py for
            the cost). The writes are data updates autograd does not record (Parameters
            and tensors that require grad are updated as by an optimizer step).
        backend, precision: as for `mod_select`.
        vocab: "strict" refuses tensors whose shapes differ; "common" merges a pair whose
            first dimension alone differs (embeddings and heads of padded vocabularies) over
            the rows both have (min, max and threshold from those rows of model 1), keeping
            model 1's further rows.
        stats: a MergeStats to fill with counts (tensors merged, elements taken).

    Merged tensors are new plain tensors (no autograd history, requires_grad False). Errors
    are ModkernError subclasses naming the key and the model (see modkern.errors); a merge
    that raises leaves sd1 and sd2 unmodified, in place too.
    """
    check_state_dicts(sd1, sd2)
    check_precision(precision)
    vocab = check_vocab(vocab)
    if stats is not None and not isinstance(stats, MergeStats):
        raise OptionError(f"stats must be a modkern.MergeStats, got {type(stats).__name__}")
    if strict:
        check_keys(sd1, sd2)
    names = names_to_merge(sd1, sd2, name_filter(include, exclude), vocab=vocab)
    plan = alphas(check_alpha_rule(alpha, names), names)
    if inplace:
        check_shared_storage(sd1, sd2, plan)
        plan = first_of_each_storage(sd1, plan)  # tied weights: merge shared storage once
    units = make_units(sd1, sd2, plan, backend)
    stats = stats if stats is not None else MergeStats()
    merged_before = stats.tensors_merged
    if inplace:
        with write_mode([u.t1 for u in units]):
            merge_inplace(units, precision, stats)
    else:
        outputs = _merge_out_of_place(units, sd1, precision, stats)
    stats.carry(len(sd1) - (stats.tensors_merged - merged_before))
    if inplace:
        return sd1  # type: ignore[return-value]
    return {name: outputs.get(name, t1) for name, t1 in sd1.items()}


@torch.no_grad()
def _merge_out_of_place(units: list, sd1: Mapping[str, torch.Tensor], precision: str,
                        stats: MergeStats) -> dict[str, torch.Tensor]:
    """Every unit into a new tensor (plain: no autograd history); name -> new tensor."""
    outputs = with_outputs(units, sd1)
    for u in units:
        if not u.packed:
            stats.add(u.name, run_single(u, precision))
    for group in batches(units):
        run_batch(group, [u.dst for u in group], precision, stats)
    return outputs
