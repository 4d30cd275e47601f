"""What a sweep over alpha found: one row per alpha (its scores, the elements the merge took
from model 2, the seconds the step and the scoring took), the best alpha, a text table
and a plot."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModkernError, OptionError
from .data import MEAN


@dataclass
class SweepRow:
    """One alpha of a sweep. `alpha` is what the step was given (a float, or an alpha rule
    for per-layer steps); `taken`/`merged` count elements (None for the mixture)."""

    alpha: object
    scores: dict[str, float]
    taken: int | None = None
    merged: int | None = None
    seconds: float = 0.0         # making the merge of this step
    score_seconds: float = 0.0   # scoring it

    @property
    def label(self) -> str:
        return alpha_label(self.alpha)

    def record(self) -> dict:
        """The row as plain JSON-able values (for a recipe file)."""
        return {"alpha": self.label if not isinstance(self.alpha, float) else self.alpha,
                "scores": dict(self.scores), "taken": self.taken, "merged": self.merged,
                "seconds": round(self.seconds, 4), "score_seconds": round(self.score_seconds, 4)}


def alpha_label(alpha: object) -> str:
    """A float as itself (`0.9`), a mapping as `pattern=value` pairs, a function by name."""
    if isinstance(alpha, float | int):
        return f"{alpha:g}"
    if isinstance(alpha, Mapping):
        return ", ".join(f"{p}={v:g}" for p, v in alpha.items())
    return getattr(alpha, "__name__", repr(alpha))


def scores_of(value: object) -> dict[str, float]:
    """A scorer's answer as a dict of floats: a number becomes {"score": x}."""
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            out[str(key)] = _number(v, f"score {key!r}")
        if not out:
            raise ModkernError("the score function returned an empty dict; expected a float "
                               "or a dict of floats")
        return out
    return {"score": _number(value, "score")}


def _number(value: object, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ModkernError(f"the score function returned {what} = {value!r}; expected a "
                           "float") from None


@dataclass
class SweepResult:
    """The rows of a sweep, in the order run. `objective` is the score that picks the best
    row (higher is better): "mean" when the scores have it, else the only score, else the
    mean of all scores."""

    rows: list[SweepRow]
    method: str = "MoD merge"    # or "mixture"
    metric: str = "score"        # what the scores are, for the table and plot
    notes: list[str] = field(default_factory=list)

    @property
    def objective(self) -> str:
        """The name of the score that picks the best row (see the class docstring), from
        the first row's scores."""
        return objective_of(self.rows[0].scores) if self.rows else MEAN

    def value(self, row: SweepRow) -> float:
        """The row's objective (NaN never wins)."""
        return objective_value(row.scores)

    @property
    def best(self) -> SweepRow:
        """The row with the highest objective (the first of equals)."""
        if not self.rows:
            raise ModkernError("the sweep has no rows: give at least one alpha")
        return max(self.rows, key=self.value)

    @property
    def best_alpha(self) -> object:
        """The alpha (or alpha rule) of the best row; ModkernError when there are no rows."""
        return self.best.alpha

    def table(self) -> str:
        """The rows as an aligned text table, the best marked with '*'."""
        keys = list(self.rows[0].scores) if self.rows else []
        width = max([len("alpha")] + [len(r.label) for r in self.rows]) + 2
        head = f"  {'alpha':<{width}}" + "".join(f"{k:>12}" for k in keys)
        with_counts = any(r.taken is not None for r in self.rows)
        if with_counts:
            head += f"{'taken from 2':>18}{'merge s':>9}"
        head += f"{'score s':>9}"
        lines = [f"{self.method}: {self.metric} by alpha (higher is better; * best "
                 f"{self.objective})", head, "-" * len(head)]
        best = self.best if self.rows else None
        for r in self.rows:
            line = f"{'*' if r is best else ' '} {r.label:<{width}}"
            line += "".join(f"{r.scores.get(k, math.nan):>12.4f}" for k in keys)
            if with_counts:
                line += f"{_count(r):>18}{r.seconds:>9.4f}"
            lines.append(line + f"{r.score_seconds:>9.4f}")
        return "\n".join(lines)

    def records(self) -> list[dict]:
        """The rows as plain JSON-able dicts (SweepRow.record), in the order run."""
        return [r.record() for r in self.rows]

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """Save the scores against alpha as a png (the best alpha marked); needs
        matplotlib (pip install 'modkern[demo]')."""
        check_plottable(self)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        draw(ax, self)
        ax.set_title(title or f"{self.method}: {self.metric} by alpha")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def objective_of(scores: Mapping[str, float]) -> str:
    """The score that ranks rows: "mean" when present, else the only score, else "mean"
    (of all the scores)."""
    keys = list(scores)
    return MEAN if MEAN in keys else keys[0] if len(keys) == 1 else MEAN


def objective_value(scores: Mapping[str, float]) -> float:
    """The value of the objective of `scores` (higher is better; NaN and no scores rank
    last)."""
    if not scores:
        return -math.inf
    key = objective_of(scores)
    v = scores[key] if key in scores else sum(scores.values()) / len(scores)
    return -math.inf if math.isnan(v) else v


def _count(row: SweepRow) -> str:
    if row.taken is None:
        return "-"
    share = row.taken / row.merged if row.merged else 0.0
    return f"{row.taken:,} ({share:.1%})"


def pyplot():
    """matplotlib.pyplot with a file-only backend, or OptionError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("plotting needs matplotlib, which is not installed: "
                          "pip install matplotlib (or 'modkern[demo]')") from None
    return plt


def check_plottable(result: SweepResult) -> None:
    """ModkernError unless `result` has rows and every row has the scores of the first
    (each is one line of the plot)."""
    if not result.rows:
        raise ModkernError(f"cannot plot the {result.method} sweep: it has no rows (give at "
                           "least one alpha)")
    keys = list(result.rows[0].scores)
    for row in result.rows[1:]:
        missing = [k for k in keys if k not in row.scores]
        if missing:
            raise ModkernError(f"cannot plot the {result.method} sweep: the row of alpha "
                               f"{row.label} has no score {missing[0]!r}, which the first "
                               f"row has; every row needs the scores {keys}")


def draw(ax, result: SweepResult, *, label_prefix: str = "") -> None:
    """Plot each score of `result` against alpha on `ax` and mark the best alpha (rules
    are plotted by step number); ModkernError when there is nothing to plot or rows lack
    a score (check_plottable)."""
    check_plottable(result)
    numeric = all(isinstance(r.alpha, float | int) for r in result.rows)
    xs = [r.alpha if numeric else i for i, r in enumerate(result.rows)]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    for key in result.rows[0].scores:
        style = "o-" if key == result.objective else ".--"
        ax.plot([xs[i] for i in order], [result.rows[i].scores[key] for i in order], style,
                label=f"{label_prefix}{key}", lw=2 if key == result.objective else 1)
    best = result.rows.index(result.best)
    ax.axvline(xs[best], color="grey", ls=":", lw=1)
    ax.annotate(f"best {result.best.label}", (xs[best], result.value(result.best)),
                textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("alpha" if numeric else "step")
    ax.set_ylabel(result.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
