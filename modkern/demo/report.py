"""The demo's results: rows, the table and the accuracy plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoint.report import format_bytes
from .tasks import TASK_A, TASK_B

if TYPE_CHECKING:
    from .run import DemoConfig


@dataclass
class Row:
    """One line of the demo table."""

    model: str
    method: str                  # base | specialist | mod | linear | mixture | distill
    alpha: float | None
    accuracy: dict[str, float]   # task name -> exact-match accuracy in [0, 1]
    elements_taken: int | None = None   # MoD: elements taken from specialist B
    elements_merged: int | None = None
    bytes_read_a: int | None = None     # by the merge, from specialist A's checkpoint
    bytes_read_b: int | None = None     # by the merge, from specialist B's checkpoint
    seconds: float | None = None        # merge time


@dataclass
class DemoResult:
    rows: list[Row]
    out: Path
    config: DemoConfig
    seconds: float
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)
    chosen: dict[str, float] = field(default_factory=dict)  # method -> alpha the sweep chose

    def row(self, model: str) -> Row:
        return next(r for r in self.rows if r.model == model)


def _size(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def format_table(result: DemoResult) -> str:
    """The demo's one table, as aligned plain text."""
    tasks = [TASK_A.name, TASK_B.name]
    head = (f"{'model':<22}{'method':<12}{'alpha':>6}" + "".join(f"{t:>10}" for t in tasks)
            + f"{'elements taken from B':>24}{'bytes read (A + B)':>22}")
    lines = [head, "-" * len(head)]
    for r in result.rows:
        alpha = "-" if r.alpha is None else f"{r.alpha:g}"
        if r.method == "mod":
            taken = f"{r.elements_taken:,} of {r.elements_merged:,}"
        elif r.method == "linear":
            taken = f"blend of {r.elements_merged:,}"
        else:
            taken = "-"
        read = "-" if r.bytes_read_a is None else \
            f"{_size(r.bytes_read_a)} + {_size(r.bytes_read_b)}"
        lines.append(f"{r.model:<22}{r.method:<12}{alpha:>6}"
                     + "".join(f"{r.accuracy[t]:>10.3f}" for t in tasks)
                     + f"{taken:>24}{read:>22}")
    return "\n".join(lines)


def save_plot(result: DemoResult, path: Path, notes: list[str]) -> Path | None:
    """Accuracy against alpha for each method and task; None (and a note) without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("matplotlib is not installed (pip install 'modkern[demo]'): no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharey=True)
    styles = {"mod": ("MoD merge", "o-"), "linear": ("linear merge", "s--"),
              "mixture": ("mixture decoding", "^:"),
              "distill": ("distilled from the mixture", "*")}
    for ax, task in zip(axes, (TASK_A.name, TASK_B.name)):
        for method, (label, style) in styles.items():
            pts = sorted((r.alpha, r.accuracy[task]) for r in result.rows if r.method == method)
            if not pts:
                continue
            line, = ax.plot([a for a, _ in pts], [y for _, y in pts], style, label=label,
                            markersize=12 if method == "distill" else 6)
            if method in result.chosen:  # the alpha the sweep chose on the validation split
                ax.axvline(result.chosen[method], color=line.get_color(), ls="--", lw=0.8,
                           label=f"{label}: alpha chosen by the sweep")
        for r, color in ((result.row("base"), "grey"),
                         (result.row(f"specialist-{TASK_A.name}"), "tab:red"),
                         (result.row(f"specialist-{TASK_B.name}"), "tab:purple")):
            ax.axhline(r.accuracy[task], color=color, lw=0.8, alpha=0.7, label=r.model)
        ax.set_title(f"{task} accuracy")
        ax.set_xlabel("alpha (weight of the addition specialist, A)")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    # one legend below both panels, where it hides no point
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
