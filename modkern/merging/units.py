"""The units of work of a state-dict merge: per merged tensor, the part that is selected
(the whole tensor, or with vocab="common" the rows both models have), where its result
goes, and the engine that runs it; small tensors on the Triton backend are grouped to be
packed into one launch pair."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..backends import resolve_backend
from ..ops import select_engine
from ..ops.output_memory import empty_output
from ..ops.select_context import SelectContext
from ..ops.select_pipeline import SelectResult, select_into, select_packed
from .counts import MergeStats
from .plan import common_rows

# Tensors up to this many elements are packed together on the Triton backend (norms,
# biases): one launch pair for all of them instead of one per tensor.
BATCH_MAX = 1 << 16


@dataclass
class Unit:
    """One merged tensor: `t1`, `t2` the parts selected (views of model 1's and model 2's
    tensors), `dst` where the result of that part goes (t1 itself in place)."""

    name: str
    t1: torch.Tensor
    t2: torch.Tensor
    alpha: float
    engine: select_engine.SelectEngine
    dst: torch.Tensor

    @property
    def context(self) -> SelectContext:
        return SelectContext(self.name)

    @property
    def packed(self) -> bool:
        """Whether this unit runs packed with others (small, on the Triton engine)."""
        return self.engine.name == "triton" and 0 < self.t1.numel() <= BATCH_MAX


def selected_parts(t1: torch.Tensor, t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of a checked pair that are selected: the tensors themselves, or their
    common leading rows when the first dimension differs (vocab="common")."""
    rows = common_rows(t1, t2)
    return (t1, t2) if rows is None else (t1[:rows], t2[:rows])


def make_units(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
               plan: dict[str, float], backend: str) -> list[Unit]:
    """The units of an in-place merge (dst is t1's part itself), every backend resolved
    before any work (a BackendError then leaves everything untouched)."""
    units = []
    for name, a in plan.items():
        t1, t2 = selected_parts(sd1[name], sd2[name])
        engine = select_engine.engine_for(resolve_backend(backend, t1, t2))
        units.append(Unit(name, t1, t2, a, engine, t1))
    return units


def with_outputs(units: list[Unit], sd1: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For an out-of-place merge: a new contiguous output per unit, holding model 1's rows
    beyond the selected part (vocab="common"); each unit's dst becomes its selected part."""
    outputs = {}
    for u in units:
        whole = sd1[u.name]
        out = empty_output(whole.shape, whole.dtype, whole.device)
        rows = u.t1.shape[0] if u.t1.shape != whole.shape else None
        if rows is not None:
            out[rows:].copy_(whole[rows:])
        u.dst = out if rows is None else out[:rows]
        outputs[u.name] = out
    return outputs


def batches(units: list[Unit]) -> list[list[Unit]]:
    """The packed units, grouped by dtype and device (one launch pair per group)."""
    groups: dict[tuple, list[Unit]] = defaultdict(list)
    for u in units:
        if u.packed:
            groups[(u.t1.dtype, u.t1.device)].append(u)
    return list(groups.values())


def run_single(u: Unit, precision: str) -> SelectResult:
    """One unpacked unit through the select pipeline, into its dst (not t1 itself)."""
    return select_into(u.dst, u.t1, u.t2, u.alpha, precision=precision, engine=u.engine,
                       context=u.context)


def run_batch(group: list[Unit], outs: list[torch.Tensor], precision: str,
              stats: MergeStats | None = None) -> list[SelectResult]:
    """Packed units through the select pipeline, their results into `outs` (written only
    after every check passed), counted in `stats` when given."""
    results = select_packed(outs, [u.t1 for u in group], [u.t2 for u in group],
                            [u.alpha for u in group], precision=precision,
                            engine=select_engine.engine_for("triton"),
                            contexts=[u.context for u in group])
    if stats is not None:
        for u, result in zip(group, results):
            stats.add(u.name, result)
    return results
