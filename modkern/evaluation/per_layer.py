"""Refining alpha per layer after a global sweep: a short coordinate search.

Starting from the best global alpha, each layer group (the tensors named
`<prefix>.layers.<i>.`, e.g. `model.layers.3.`) in turn tries the grid's neighbours of its
current alpha (one step down and up), all other groups fixed, and keeps the best. Each
candidate is an alpha rule (a pattern mapping, `"*"` the global alpha), applied by the
sweep at the cost of its changes: only the tensors of the group being tried move.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..merging.sweep import MergeSweep
from .result import SweepRow, objective_value
from .sweep import Score, score_step

LAYER = re.compile(r"^(.*\.layers\.\d+\.)")


def layer_groups(names: Iterable[str]) -> list[str]:
    """The layer prefixes of `names` ("model.layers.0.", ...), in order of first
    appearance."""
    return list(dict.fromkeys(m.group(1) for n in names if (m := LAYER.match(n))))


def group_pattern(prefix: str) -> str:
    """A glob pattern matching the names that start with `prefix` (its glob characters
    escaped)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in prefix) + "*"


def rule_of(alphas: dict[str, float], default: float) -> dict[str, float]:
    """The alpha rule of per-group alphas: a pattern for each group off the default, then
    "*" for the rest."""
    rule = {group_pattern(g): a for g, a in alphas.items() if a != default}
    rule["*"] = default
    return rule


@dataclass
class PerLayerResult:
    """What the search found: the rule, its objective, the global best's, and every
    candidate scored."""

    rule: dict[str, float]
    value: float
    start_value: float
    rows: list[SweepRow] = field(default_factory=list)

    @property
    def gain(self) -> float:
        """How much the per-layer rule beats the best global alpha (>= 0)."""
        return self.value - self.start_value

    def summary(self) -> str:
        changed = {p: a for p, a in self.rule.items() if p != "*"}
        what = (", ".join(f"{p.rstrip('*')}={a:g}" for p, a in changed.items())
                if changed else "no layer gains from another alpha")
        return (f"per-layer: {len(self.rows)} candidates scored; {what}; objective "
                f"{self.value:.4f} vs {self.start_value:.4f} at the best global alpha "
                f"(gain {self.gain:+.4f})")


def refine_per_layer(swept: MergeSweep, model: torch.nn.Module, score: Score,
                     grid: list[float], start: float, start_value: float, *,
                     on_row: Callable[[SweepRow], None] | None = None) -> PerLayerResult:
    """One pass of the coordinate search over the layer groups of the swept tensors (see
    the module docstring). `grid`: the alphas the sweep was set up for (sorted); `start`:
    the best global alpha and `start_value` its objective."""
    grid = sorted(grid)
    current = {g: start for g in layer_groups(swept.names)}
    best_value, rows = start_value, []
    for group in current:
        i = grid.index(current[group])
        chosen = current[group]
        for alpha in grid[max(i - 1, 0):i + 2]:
            if alpha == current[group]:
                continue
            trial = rule_of({**current, group: alpha}, start)
            row = score_step(swept, None, trial, model, score, on_row)
            rows.append(row)
            if objective_value(row.scores) > best_value:
                best_value, chosen = objective_value(row.scores), alpha
        current[group] = chosen
    return PerLayerResult(rule_of(current, start), best_value, start_value, rows)
