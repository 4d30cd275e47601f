"""The demo's sweep step: alpha for the MoD merge and for mixture decoding, chosen by the
sweep on a validation split (prompts kept out of training and apart from the test prompts
the table reports), by the mean log-likelihood of the answers and their end-of-sequence
token over both tasks.

The MoD sweep patches one working copy of specialist A from one alpha to the next
(`modkern.sweep`); the mixture sweep runs each specialist once per batch and mixes their
distributions at every alpha (`modkern.sweep_mixture`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import OptionError
from ..evaluation.data import Example
from ..evaluation.result import SweepResult, draw, pyplot
from ..evaluation.scoring import EvalSet, loglik_scorer
from ..evaluation.sweep import sweep, sweep_mixture
from .tasks import Task, held_out

GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95
SEED = 20_000  # validation prompts: other seeds than the test prompts' (10_000 + i)


def validation_split(tasks: tuple[Task, ...], n: int,
                     test_prompts: set[str]) -> list[Example]:
    """n validation examples of each task (distinct prompts), none of them a test prompt."""
    return [Example(prompt, answer, task.name) for i, task in enumerate(tasks)
            for prompt, answer in held_out(task, n, seed=SEED + i, exclude=test_prompts)]


@dataclass
class SweepChoice:
    """Both sweeps on the validation split and what they chose."""

    mod: SweepResult
    mixture: SweepResult
    seconds: float

    @property
    def mod_alpha(self) -> float:
        return self.mod.best_alpha

    @property
    def mixture_alpha(self) -> float:
        return self.mixture.best_alpha

    def summary(self) -> str:
        return (f"the sweep on the validation split chose alpha = {self.mod_alpha:g} for the "
                f"MoD merge and {self.mixture_alpha:g} for mixture decoding "
                f"({len(GRID)} alphas each, {self.seconds:.1f} s)")


def choose_alphas(model_a, model_b, tokenizer, validation: list[Example],
                  log: Callable[[str], None] = print) -> SweepChoice:
    """Sweep both alphas over GRID on `validation`; the MoD sweep runs in descending order
    (each element written at most once), its rows are kept in ascending order."""
    start = time.perf_counter()
    data = EvalSet(validation, tokenizer, batch_size=64, add_eos=True)
    mod = sweep(model_a, model_b, sorted(GRID, reverse=True), loglik_scorer(data))
    mod.rows.sort(key=lambda r: r.alpha)
    mixture = sweep_mixture(model_a, model_b, GRID, data)
    choice = SweepChoice(mod, mixture, time.perf_counter() - start)
    log(choice.summary())
    return choice


def save_sweep(choice: SweepChoice, out: Path, plot: bool) -> Path | None:
    """sweep.txt (both tables) and, with `plot` and matplotlib, sweep.png (validation
    log-likelihood against alpha, the chosen alphas marked)."""
    (out / "sweep.txt").write_text(choice.mod.table() + "\n\n" + choice.mixture.table()
                                   + "\n")
    (out / "sweep.png").unlink(missing_ok=True)
    if not plot:
        return None
    try:
        plt = pyplot()
    except OptionError:  # no matplotlib: the demo's own plot already notes it
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    try:
        for ax, result in zip(axes, (choice.mod, choice.mixture)):
            draw(ax, result)
            ax.set_title(f"{result.method}: validation log-likelihood")
            ax.set_xlim(0, 1)
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=100)
    finally:
        plt.close(fig)
    return out / "sweep.png"
