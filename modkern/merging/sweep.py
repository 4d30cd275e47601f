"""Sweeping a merge over alpha (docs/design.md 1.3): `sweep_merges` over two state dicts (its
steps a `MergeSteps` iterator), and `MergeSweep`, the state behind it, which the model and
checkpoint sweeps share.

Every step equals `merge_state_dicts` at that step's alpha (rule) bit for bit: the same
plan (merging/plan.py: names, pair checks, alpha per name), the same select pipeline
(`FlatSelect.bounds` for each tensor's min and max, `select_threshold`, model 2's values
from a `ValueSource`), the same errors at the same step. Each tensor is a `TensorSweep`
(ops/select_sweep.py): a step writes only the elements whose result changes.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..backends import resolve_backend
from ..checks import check_precision
from ..errors import AlphaError, ModkernError, OptionError
from ..ops.select_context import SelectContext
from ..ops.select_engine import engine_for
from ..ops.select_pipeline import FlatSelect, SelectResult
from ..ops.select_reference import select_threshold
from ..ops.select_source import TensorSource, ValueSource
from ..ops.select_buckets import run_groupings
from ..ops.select_sweep import TensorSweep
from ..ops.tensor_memory import view_key
from .counts import MergeStats
from .patterns import AlphaRule, Patterns, check_alpha_rule, name_filter
from .plan import (ContextOf, alphas as plan_alphas, check_keys, check_state_dicts,
                   names_to_merge)
from .inplace import check_shared_storage

Plan = dict[str, float]


@dataclass
class Pending:
    """A tensor whose sweep is being set up: its working tensor (flat, holding t1), t1's
    min and max, and the alphas it will meet."""

    name: str
    flat: torch.Tensor
    mn: torch.Tensor
    mx: torch.Tensor
    wanted: list[float]


def sweep_merges(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
                 alphas: Iterable[AlphaRule], *, include: Patterns = None,
                 exclude: Patterns = None, precision: str = "exact", strict: bool = True,
                 backend: str = "auto") -> "MergeSteps":
    """Merge two state dicts at many alphas, one after another, at the cost of what changes.

    Returns an iterator (MergeSteps) of `(alpha, merged)` for each entry of `alphas`, in
    its order, where `merged` equals `merge_state_dicts(sd1, sd2, alpha, include=include,
    exclude=exclude, precision=precision, strict=strict)` bit for bit. `merged` is one
    working dict updated in place between steps (the same dict and the same tensors every
    step): copy what you want to keep (`{k: v.clone() for k, v in merged.items()}`). Its
    carried-over entries are sd1's own tensors, as merge_state_dicts returns them; its
    merged tensors never carry autograd history (sd1's parameters may require grad). sd1
    and sd2 are never modified.

    Args:
        sd1, sd2: the base model's (model 1) and the other model's state dicts.
        alphas: the steps, a list (or any iterable): floats in [0, 1], or alpha rules as
            merge_state_dicts takes them (a mapping name pattern -> float, or a function of
            the name returning a float or None), e.g. for a search per layer. A single
            alpha is refused (AlphaError): give `[alpha]`. Read whole at the first step (a
            function rule is called then, once for every name; its step uses those
            answers).
        include, exclude, precision, strict, backend: as for merge_state_dicts.

    Cost: the first step is about one merge; with every alpha known up front, each
    tensor's elements at or above the lowest alpha's threshold are grouped by the
    thresholds once, so a later step writes only the elements between its threshold and
    the previous one. Any order is correct; monotone orders (descending or ascending)
    write each element at most once. Memory: one merged copy of the merged tensors, plus
    (4 + b) bytes per element that the lowest alpha takes from model 2 (b: the weights'
    bytes; about 3 bytes per bf16 weight at alpha 0.5 on bell-shaped weights).

    Errors are those merge_state_dicts raises, raised by `next` at the step where it
    would raise them. Nothing is read or checked before the first step (but a single alpha
    given as `alphas` is refused at once). An error of one
    step (its alpha rule, a value that is not finite which it would take) ends only that
    step: the iterator has already moved on, so catching the error and calling `next`
    again gives the following step. An error of the state dicts themselves (keys, a pair
    of tensors, name filters, options) is raised by every step, as merge_state_dicts
    raises it at every alpha.
    """
    check_steps(alphas, "sweep_merges")
    options = dict(include=include, exclude=exclude, precision=precision, strict=strict,
                   backend=backend)
    return MergeSteps(SweepInputs(sd1, sd2), alphas, options)


def check_steps(alphas: object, where: str) -> None:
    """AlphaError when `alphas`, meant to be a list of steps, is one alpha (a number, a
    mapping rule, a function rule) or not iterable."""
    single = (isinstance(alphas, numbers.Number | str | Mapping)
              or isinstance(alphas, torch.Tensor) and alphas.dim() == 0
              or not isinstance(alphas, Iterable))
    if single:
        raise AlphaError(f"{where}: alphas must be a list of alphas or alpha rules, one per "
                         f"step; got the single {type(alphas).__name__} {alphas!r}: give "
                         f"[{alphas!r}] for one step")


class MergeSteps(Iterator[tuple[AlphaRule, dict[str, torch.Tensor]]]):
    """The iterator `sweep_merges` returns: `next` gives `(alpha, merged)` for the next
    step. It moves past a step before making it, so a step that raises can be skipped by
    calling `next` again (see sweep_merges). Set-up and steps run under torch.no_grad."""

    def __init__(self, inputs: SweepInputs, alphas: Iterable[AlphaRule], options: dict):
        self.inputs, self.alphas, self.options = inputs, alphas, options
        self.rules: list[AlphaRule] | None = None  # read at the first step
        self.sweep: MergeSweep | None = None
        self.setup_error: ModkernError | None = None
        self.position = 0

    def __iter__(self) -> "MergeSteps":
        return self

    def __next__(self) -> tuple[AlphaRule, dict[str, torch.Tensor]]:
        if self.rules is None:
            self.rules = list(self.alphas)
        k = self.position
        if k >= len(self.rules):
            raise StopIteration
        self.position += 1  # before stepping: a step that raises is passed over
        with torch.no_grad():
            return self.rules[k], self.set_up().step(k)

    def set_up(self) -> "MergeSweep":
        """The sweep, set up at the first step; an error of the set-up is kept and raised
        by every step (it concerns them all)."""
        if self.setup_error is not None:
            raise self.setup_error
        if self.sweep is None:
            try:
                self.sweep = MergeSweep(self.inputs, self.rules, **self.options)
            except ModkernError as err:
                self.setup_error = err
                raise
        return self.sweep


@dataclass
class SweepInputs:
    """What a sweep reads and writes.

    sd1, sd2: the models' tensors by name, for the plan (real tensors, or meta tensors
        with a checkpoint's dtypes and shapes).
    working: tensors holding model 1's values that the sweep patches in place (a working
        copy of model 1, e.g. its parameters); None: new tensors (copies of sd1's).
    source_of: model 2's values of a tensor (default: sd2's tensor).
    original_of: model 1's values of a tensor, read where a step gives elements back to
        model 1 (default: sd1's tensor).
    context_of: names a tensor (and its files) in errors.
    headers: True when sd1 and sd2 are meta tensors standing for checkpoint headers (their
        values come from source_of and original_of); otherwise meta tensors are refused."""

    sd1: Mapping[str, torch.Tensor]
    sd2: Mapping[str, torch.Tensor]
    working: Mapping[str, torch.Tensor] | None = None
    source_of: Callable[[str], ValueSource] | None = None
    original_of: Callable[[str], ValueSource] | None = None
    context_of: ContextOf = SelectContext
    headers: bool = False


class MergeSweep:
    """The state of a sweep over the alpha rules `rules` (see sweep_merges): `step(k)`
    makes the result the merge at rules[k]; `apply(rule)` at any other rule (an alpha a
    tensor has not seen regroups that tensor). `stats` counts the last step."""

    def __init__(self, inputs: SweepInputs, rules: list[AlphaRule], *,
                 include: Patterns = None, exclude: Patterns = None,
                 precision: str = "exact", strict: bool = True, backend: str = "auto"):
        check_state_dicts(inputs.sd1, inputs.sd2)
        self.inputs, self.precision, self.backend = inputs, check_precision(precision), backend
        if strict:
            check_keys(inputs.sd1, inputs.sd2)
        self.names = names_to_merge(inputs.sd1, inputs.sd2, name_filter(include, exclude),
                                    inputs.context_of, need_data=not inputs.headers)
        self.plans = [self._plan(rule) for rule in rules]
        self.leader = self._leaders()
        self.merged: dict[str, torch.Tensor] = dict(inputs.sd1)
        self.stats = MergeStats()
        self.working_of: dict[str, torch.Tensor] = {}  # set-up leaders -> working tensor
        self.tensors: dict[str, TensorSweep | None] = {}  # None: an empty tensor
        self.errors: dict[str, Exception] = {}
        self._build([self._bounds(n, w) for n, w in self._wanted().items()])

    @property
    def inplace(self) -> bool:
        return self.inputs.working is not None

    # --- setting up ---------------------------------------------------------------------

    def _plan(self, rule: AlphaRule) -> Plan | Exception:
        """The alpha of each merged name under `rule`, or the error merge_state_dicts would
        raise for it (raised at its step)."""
        try:
            checked = check_alpha_rule(rule, self.names)
            return plan_alphas(checked, self.names, self.inputs.context_of)
        except Exception as err:  # noqa: BLE001 -- a user's function rule too: raised at its step
            return err

    def _wanted(self) -> dict[str, list[float]]:
        """The alphas each leader meets, in the order the plans give them (first time
        seen), the leaders in the order of the names; one pass over the plans."""
        seen: dict[str, dict[float, None]] = {}
        for plan in self.plans:
            if isinstance(plan, dict):
                for name, a in plan.items():
                    seen.setdefault(self.leader[name], {})[a] = None
        return {lead: list(seen[lead]) for lead in dict.fromkeys(self.leader.values())
                if lead in seen}

    def _leaders(self) -> dict[str, str]:
        """In place, tensors that share memory (tied weights) are swept once, by the first
        of them; otherwise every name leads itself."""
        if not self.inplace:
            return {n: n for n in self.names}
        first: dict[tuple, str] = {}
        return {n: first.setdefault(view_key(self.inputs.working[n]), n)
                for n in self.names}

    def _bounds(self, name: str, wanted: list[float]) -> Pending | None:
        """The working tensor of `name` (holding t1) and t1's min and max; None for an
        empty tensor or an error (a non-finite t1: kept, raised at the steps that merge
        it)."""
        t1 = self.inputs.sd1[name]
        if self.inplace:
            work = self.inputs.working[name]
            if not work.is_contiguous():  # patched through a flat view
                raise OptionError(f"sweep: the working tensor of {name!r} is not contiguous; "
                                  "it is patched in place through a flat view")
            flat, src = work.view(-1), None
        else:
            work = torch.empty(t1.shape, dtype=t1.dtype, device=t1.device)
            flat, src = work.view(-1), t1.contiguous().view(-1)
        self.working_of[name] = work
        self.tensors[name] = None
        engine = engine_for(resolve_backend(self.backend, work))
        try:
            mn, mx = FlatSelect(flat, engine, self.inputs.context_of(name), src).bounds()
        except ModkernError as err:
            self.errors[name] = err
            return None
        return Pending(name, flat, mn, mx, wanted) if flat.numel() else None

    def _build(self, pending: list[Pending | None]) -> None:
        """The TensorSweeps of the tensors whose bounds are known: their thresholds found
        together per dtype and device (one vectorized search instead of one per tensor),
        their groupings run together (the chunks of all tensors share the threads)."""
        batches: dict[tuple, list[Pending]] = defaultdict(list)
        for p in pending:
            if p is not None:
                batches[(p.flat.dtype, p.flat.device)].append(p)
        for batch in batches.values():
            width = max(len(p.wanted) for p in batch)
            alphas = torch.tensor([p.wanted + p.wanted[-1:] * (width - len(p.wanted))
                                   for p in batch], dtype=torch.float64)
            mn = torch.stack([p.mn.reshape(1) for p in batch])  # [T, 1] against alphas [T, K]
            mx = torch.stack([p.mx.reshape(1) for p in batch])
            thresholds = select_threshold(mn, mx, alphas.to(mn.device), self.precision)
            for p, v in zip(batch, thresholds):
                self.tensors[p.name] = self._tensor_sweep(p, v[:len(p.wanted)])
        built = [self.tensors[p.name] for p in pending if p is not None]
        for ts, groups in zip(built, run_groupings([ts.grouping for ts in built])):
            ts.finish(groups)

    def _tensor_sweep(self, p: Pending, thresholds: torch.Tensor) -> TensorSweep:
        t1, t2, name = self.inputs.sd1[p.name], self.inputs.sd2[p.name], p.name
        source = (self.inputs.source_of or (lambda n: TensorSource(t2)))(name)
        original = (self.inputs.original_of or (lambda n: TensorSource(t1)))(name)
        return TensorSweep(p.flat, (p.mn, p.mx), p.wanted, precision=self.precision,
                           source=source, original=original,
                           context=self.inputs.context_of(name), thresholds=thresholds)

    # --- steps --------------------------------------------------------------------------

    def step(self, k: int) -> dict[str, torch.Tensor]:
        """The merge at the k-th rule: the working dict (see sweep_merges)."""
        plan = self.plans[k]
        if isinstance(plan, Exception):
            raise plan
        return self._apply(plan)

    def apply(self, rule: AlphaRule) -> dict[str, torch.Tensor]:
        """The merge at any alpha rule (a tensor that meets an alpha it was not set up for
        regroups first)."""
        plan = self._plan(rule)
        if isinstance(plan, Exception):
            raise plan
        self._build([self._bounds(name, [a]) for name, a in plan.items()
                     if self.leader[name] == name and name not in self.working_of])
        return self._apply(plan)

    def _apply(self, plan: Plan) -> dict[str, torch.Tensor]:
        """Patch every tensor to its level under `plan`, in the plan's order (so the first
        error is the one merge_state_dicts raises); the working dict (in place: the
        working tensors)."""
        if self.inplace:
            check_shared_storage(self.inputs.working, self.inputs.sd2, plan,
                                 "sweep the state dicts (sweep_merges) instead")
        stats = MergeStats()
        levels: dict[str, int] = {}  # leader -> its level at this step
        for name, a in plan.items():
            lead = self.leader[name]
            if lead in self.errors:
                raise self.errors[lead]
            ts = self.tensors[lead]
            if ts is not None and lead not in levels:
                levels[lead] = ts.level_for(a)
                ts.go(levels[lead])
            taken = ts.taken(levels[lead]) if ts is not None else 0
            stats.add(name, SelectResult(taken, self.inputs.sd1[name].numel()))
            self.merged[name] = self.working_of[lead]
        for name, ts in self.tensors.items():
            if name not in plan and not (self.inplace and name in levels):
                self.merged[name] = self.inputs.sd1[name]
                if self.inplace and ts is not None:
                    ts.go(ts.levels)  # not merged at this step: model 1's values
        stats.carry(len(self.inputs.sd1) - stats.tensors_merged)
        self.stats = stats
        return self.merged

    @property
    def nbytes(self) -> int:
        """Bytes of the sweep's index and model 2's values (the working tensors aside)."""
        return sum(ts.nbytes for ts in self.tensors.values() if ts is not None)
