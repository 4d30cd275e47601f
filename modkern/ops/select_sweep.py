"""One tensor of a sweep over alpha (docs/design.md 1.3): the select at many alphas, each step
writing only the elements that change.

A `TensorSweep` starts from a working tensor that holds t1 (its min and max already taken
by the select pipeline's `FlatSelect.bounds`, which also copies t1 there out of place).
With every alpha of the sweep known, it finds each alpha's exact threshold
(`select_threshold`, so `norm(x) < alpha <=> x < v`), groups the elements of t1 by the
intervals between the thresholds (select_buckets.py) and reads model 2's values once, at
the elements the lowest threshold selects. A step to alpha a then writes model 2's values
into the groups that a takes and the previous step did not, or t1's values (read from
`original`) into the groups the previous step took and a does not: exactly the elements
whose result differs. Each step's result equals the pipeline's select at that alpha, bit
for bit: same threshold, same values (model 2's converted to t1's dtype as `take_at`
converts them), same errors (a non-finite value of model 2 is refused at the first step
that would take it, naming its smallest flat index, before anything is written).

Memory: per tensor, the flat index (int32 below 2**31 elements) and model 2's value of
every element the lowest alpha selects: (4 + b) bytes each for b-byte weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .select_buckets import ArrayOps, Grouping, Groups, run_groupings, threshold_keys
from .select_context import SelectContext
from .select_pipeline import value_at
from .select_reference import INT_OF_SIZE, select_threshold
from .select_source import ValueSource


class TensorSweep:
    """The sweep state of one tensor (see the module docstring).

    flat: the contiguous 1-D working tensor, holding t1's values; patched in place.
    bounds: t1's (min, max) (0-dim, t1's dtype), from `FlatSelect.bounds`.
    alphas: the alphas the sweep will visit (any order, repeats allowed); another alpha
        still works but costs a regrouping of this tensor.
    source: model 2's values (read once, at the lowest alpha's selection).
    original: t1's values, read where a step gives elements back to t1.
    thresholds: select_threshold(mn, mx, alphas), when the caller found them already (for
        many tensors at once).

    The grouping itself is left to the caller: `group()` runs it here, or the caller runs
    the `grouping` jobs of many tensors together (select_buckets.run_groupings) and hands
    each its groups with `finish`."""

    def __init__(self, flat: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor],
                 alphas: Sequence[float], *, precision: str, source: ValueSource,
                 original: ValueSource, context: SelectContext,
                 thresholds: torch.Tensor | None = None):
        self.flat, (self.mn, self.mx), self.precision = flat, bounds, precision
        self.source, self.original, self.context = source, original, context
        self.ops = ArrayOps.for_tensor(flat)
        self.bits = self.ops.bits(flat)
        self._index(list(alphas), thresholds)

    # --- building -----------------------------------------------------------------------

    def _index(self, alphas: list[float], thresholds: torch.Tensor | None = None) -> None:
        """The thresholds of `alphas` (found here unless given), their levels, and the
        grouping of t1 by them (`flat` must hold t1)."""
        if thresholds is None:
            thresholds = self._thresholds(alphas)
        keys = threshold_keys(thresholds)
        self.keys = sorted(set(keys))
        self.alphas = list(alphas)
        self.level_of = {a: self.keys.index(k) for a, k in zip(alphas, keys)}
        self.grouping = Grouping(self.flat, self.keys, self._read_source, self.ops)

    def group(self) -> "TensorSweep":
        """Run the grouping here (one tensor's chunks); self."""
        self.finish(run_groupings([self.grouping])[0])
        return self

    def finish(self, groups: Groups) -> None:
        """Take the groups of `grouping`; the working tensor holds t1 (nothing taken)."""
        self.groups = groups
        sizes, bad = groups.sizes, groups.first_bad
        self.taken_at = [sum(sizes[j:]) for j in range(len(sizes) + 1)]
        self.first_bad_at = [min((b for b in bad[j:] if b is not None), default=None)
                             for j in range(len(bad) + 1)]
        self.level = len(self.keys)

    def _thresholds(self, alphas: list[float]) -> torch.Tensor:
        a = torch.tensor(alphas, dtype=torch.float64, device=self.mn.device)
        return select_threshold(self.mn, self.mx, a, self.precision).reshape(-1)

    def _read_source(self, selected, start: int):
        return self._read(self.source, selected, start)

    def _read(self, source: ValueSource, index, start: int = 0):
        """source's values at sorted flat indices `start + index` (an array of self.ops),
        converted to t1's dtype as the select pipeline converts them, as bits (a numpy take
        of a CPU tensor's bits when the source holds one: several times faster than a
        torch gather)."""
        t, dtype = source.tensor, self.flat.dtype
        if self.ops.numpy and t is not None and t.device.type == "cpu" and t.is_contiguous():
            raw = np.take(ArrayOps().bits(t.view(-1))[start:], index)
            if t.dtype == dtype:
                return raw
            values = torch.from_numpy(raw).view(t.dtype).to(dtype)
        else:
            flat_index = self.ops.to_torch(index + start if start else index)
            values = source.read(flat_index).to(device=self.flat.device, dtype=dtype)
        return self.ops.from_torch(values.view(INT_OF_SIZE[values.element_size()]))

    # --- steps --------------------------------------------------------------------------

    @property
    def levels(self) -> int:
        """The level at which nothing is taken from model 2 (the working tensor holds t1);
        level j takes groups j and above."""
        return len(self.keys)

    def level_for(self, alpha: float | None) -> int:
        """The level of `alpha` (None: not merged, t1 everywhere); an alpha whose threshold
        is new regroups this tensor (t1 is restored first)."""
        if alpha is None:
            return self.levels
        if alpha not in self.level_of:
            key = threshold_keys(self._thresholds([alpha]))[0]
            if key in self.keys:
                self.level_of[alpha] = self.keys.index(key)
            else:
                self.go(self.levels)
                self._index(self.alphas + [alpha])
                self.group()
        return self.level_of[alpha]

    def taken(self, level: int) -> int:
        """Elements of model 2 in the result at `level`."""
        return self.taken_at[level]

    def check(self, level: int) -> None:
        """Raise NonFiniteError if the select at `level` would take a value of model 2 that
        is not finite in t1's dtype (the smallest such flat index, as the pipeline does)."""
        bad = self.first_bad_at[level]
        if bad is not None:
            raise self.context.nonfinite_other(value_at(self.source, bad), bad,
                                               self.flat.dtype)

    def go(self, level: int) -> None:
        """Make the working tensor the select at `level`, writing only what changes."""
        if level < self.level:
            self.check(level)
            for j in range(level, self.level):
                for piece in self.groups.pieces[j]:
                    self.bits[self.ops.wide(piece.index)] = piece.values
        for j in range(self.level, level):
            for piece in self.groups.pieces[j]:
                index = self.ops.wide(piece.index)
                self.bits[index] = self._read(self.original, index)
        self.level = level

    @property
    def nbytes(self) -> int:
        """Bytes held by the grouped index and model 2's values."""
        return sum(p.index.nbytes + p.values.nbytes
                   for pieces in self.groups.pieces for p in pieces)
