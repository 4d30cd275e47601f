"""The one counter of what a merge did, shared by `MergeStats` (merge_state_dicts) and
`MergeReport` (the checkpoint merges): one `add` per merged tensor or row block, one
`carry` per tensor carried over unmerged, one `combine` to sum the counters of the parts
of one merge (the ranks of a distributed merge)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from ..ops.select_pipeline import SelectResult


class Counting:
    """The counting methods, over the fields `tensors_merged`, `elements_merged`,
    `elements_taken`, `taken_by_key` and the count of tensors carried over (its field is
    named by CARRIED); SUMMED names every field `combine` adds up."""

    CARRIED: ClassVar[str] = "tensors_carried"
    SUMMED: ClassVar[tuple[str, ...]] = ("tensors_merged", "elements_merged",
                                         "elements_taken")
    tensors_merged: int
    elements_merged: int
    elements_taken: int
    taken_by_key: dict[str, int]

    def add(self, name: str, result: SelectResult, whole: bool = True) -> None:
        """Count one merged tensor `name`, or (whole=False) one more part of it."""
        self.tensors_merged += whole
        self.elements_merged += result.numel
        self.elements_taken += result.taken
        self.taken_by_key[name] = self.taken_by_key.get(name, 0) + result.taken

    def carry(self, tensors: int = 1) -> None:
        """Count tensors carried over unmerged."""
        setattr(self, self.CARRIED, getattr(self, self.CARRIED) + tensors)

    def combine(self, parts: Iterable["Counting"], order: list[str]) -> None:
        """Set this counter to the sum of `parts` (taken_by_key in the order of `order`)."""
        parts = list(parts)
        for name in (*self.SUMMED, self.CARRIED):
            setattr(self, name, sum(getattr(p, name) for p in parts))
        taken: dict[str, int] = {}
        for part in parts:
            for key, n in part.taken_by_key.items():
                taken[key] = taken.get(key, 0) + n
        self.taken_by_key = {key: taken[key] for key in order if key in taken}


@dataclass
class MergeStats(Counting):
    """Counts a merge fills in when passed as `stats=`."""

    tensors_merged: int = 0
    tensors_carried: int = 0
    elements_merged: int = 0
    elements_taken: int = 0
    taken_by_key: dict[str, int] = field(default_factory=dict)
