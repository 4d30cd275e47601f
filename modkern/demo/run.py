"""MoD end to end on a laptop CPU, with nothing downloaded: the machinery of `modkern demo`.

1. Build a tiny Qwen2 model (seeded) with a character-level tokenizer and pretrain it
   briefly on copying strings ("ab3=ab3"): the common base.
2. Fine-tune two copies of the base, one on digit addition ("57+8=65"), one on string
   reversal ("abcd=dcba"), and save both as Hugging Face checkpoints (safetensors).
3. Choose alpha for the MoD merge and for mixture decoding by a sweep on a validation
   split (prompts kept apart from training and from the test prompts).
4. Merge the two checkpoints by MoD weight select at a few alphas (and the chosen one),
   and by a plain linear average alpha*A + (1-alpha)*B for comparison, each written as a
   checkpoint.
5. Decode with the mixture of the two specialists' distributions at the same alphas.
6. Distil the base from the 0.5 / 0.5 mixture of both specialists on both tasks.
7. Score every model by exact-match greedy accuracy on held-out prompts of both tasks.

Everything is seeded: a run with the same options and thread count prints the same table.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..distill.train import DistillConfig
from .merges import linear_merge_checkpoint, mod_merge_checkpoint
from .report import DemoResult, Row, format_table, save_plot
from .sweep_step import SweepChoice, choose_alphas, save_sweep, validation_split
from .tasks import (ALPHABET, TASK_A, TASK_B, Task, copying, distill, greedy, held_out, score,
                    train)
from .toy import char_tokenizer, tiny_causal_lm


@dataclass(frozen=True)
class Stage:
    """One training stage: optimizer steps and learning rate."""

    steps: int
    lr: float


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules; `quick()` is the reduced run CI uses."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain: Stage = Stage(300, 3e-3)
    finetune: Stage = Stage(500, 3e-3)
    distill: Stage = Stage(600, 1e-2)
    # T = 4 did better than T = 2 or 6 on these specialists (the README's demo section).
    distill_temperature: float = 4.0
    batch: int = 64
    eval_examples: int = 200
    alphas: tuple[float, ...] = field(default=(0.1, 0.3, 0.5, 0.7, 0.9))
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        return cls(pretrain=Stage(100, 3e-3), finetune=Stage(300, 3e-3),
                   distill=Stage(150, 1e-2), eval_examples=64, alphas=(0.1, 0.5, 0.9),
                   seed=seed)


def _clear(folder: Path) -> None:
    """Remove a previous run's output folder of the same name (run_demo's own files)."""
    if folder.is_dir():
        shutil.rmtree(folder)


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                dtype=torch.float32).eval()


# ---------------------------------------------------------------- the steps of a run

class _Run:
    """One demo run into `out`: the data splits, the rows scored so far, and the steps."""

    def __init__(self, out: Path, config: DemoConfig, log: Callable[[str], None]):
        self.out, self.config, self.log = out, config, log
        self.tok = char_tokenizer(ALPHABET)
        self.evals = {t.name: held_out(t, config.eval_examples, seed=10_000 + i)
                      for i, t in enumerate((TASK_A, TASK_B))}
        tests = {p for exs in self.evals.values() for p, _ in exs}
        self.validation = validation_split((TASK_A, TASK_B), max(16, config.eval_examples // 2),
                                           tests)
        # no training prompt is a test or validation prompt
        self.excluded = tests | {e.prompt for e in self.validation}
        self.rows: list[Row] = []

    def score(self, name: str, method: str, alpha: float | None, model) -> None:
        self.rows.append(Row(name, method, alpha, score(
            lambda prompts, n: greedy(model, self.tok, prompts, n), self.evals)))

    def save(self, model, name: str) -> Path:
        folder = self.out / name
        _clear(folder)
        model.save_pretrained(folder)
        self.tok.save_pretrained(folder)
        return folder

    def base(self) -> Path:
        """The base, pretrained on copying and saved; scored."""
        c, t0 = self.config, time.perf_counter()
        model = tiny_causal_lm(len(self.tok), hidden=c.hidden, layers=c.layers, heads=c.heads,
                               kv_heads=max(1, c.heads // 2), seed=c.seed)
        loss = train(model, self.tok, Task("copying", copying), steps=c.pretrain.steps,
                     batch=c.batch, lr=c.pretrain.lr, seed=c.seed + 1, exclude=self.excluded)
        folder = self.save(model, "base")
        self.log(f"pretrained the base on copying: {c.pretrain.steps} steps, "
                 f"final loss {loss:.3f}, {time.perf_counter() - t0:.1f} s")
        self.score("base", "base", None, model)
        return folder

    def specialists(self, base_dir: Path) -> tuple[Path, Path]:
        """The base fine-tuned on each task, saved; scored."""
        c, folders = self.config, []
        for i, task in enumerate((TASK_A, TASK_B)):
            t0 = time.perf_counter()
            model = load(base_dir)
            loss = train(model, self.tok, task, steps=c.finetune.steps, batch=c.batch,
                         lr=c.finetune.lr, seed=c.seed + 2 + i, exclude=self.excluded)
            name = f"specialist-{task.name}"
            folders.append(self.save(model, name))
            self.log(f"fine-tuned {name}: {c.finetune.steps} steps, "
                     f"final loss {loss:.3f}, {time.perf_counter() - t0:.1f} s")
            self.score(name, "specialist", None, model)
        return folders[0], folders[1]

    def merges(self, a_dir: Path, b_dir: Path, chosen: float) -> None:
        """MoD merges at every alpha and the chosen one, linear merges at every alpha."""
        t0 = time.perf_counter()
        for method, merge, extra in (("mod", mod_merge_checkpoint, {chosen}),
                                     ("linear", linear_merge_checkpoint, set())):
            for alpha in sorted(set(self.config.alphas) | extra):
                folder = self.out / f"{method}-{alpha:g}"
                _clear(folder)
                row = merge(a_dir, b_dir, folder, alpha)
                row.accuracy = score(lambda prompts, n, m=load(folder): greedy(
                    m, self.tok, prompts, n), self.evals)
                self.rows.append(row)
        self.log(f"merged the specialists by MoD and linearly at alpha = "
                 f"{', '.join(f'{a:g}' for a in self.config.alphas)} and scored the merges, "
                 f"{time.perf_counter() - t0:.1f} s")

    def mixtures(self, model_a, model_b, chosen: float) -> None:
        """Mixture decoding at every alpha and the chosen one."""
        from ..decoding.generation import generate as mixture_generate

        t0 = time.perf_counter()
        for alpha in sorted(set(self.config.alphas) | {chosen}):
            acc = score(lambda prompts, n, alpha=alpha: mixture_generate(
                model_a, model_b, self.tok, prompts, alpha, max_new_tokens=n), self.evals)
            self.rows.append(Row(f"mixture-{alpha:g}", "mixture", alpha, acc))
        self.log(f"decoded with the mixture of both specialists, "
                 f"{time.perf_counter() - t0:.1f} s")

    def distilled(self, base_dir: Path, model_a, model_b) -> None:
        """The base distilled from the 0.5 / 0.5 mixture of both specialists; scored."""
        c, t0 = self.config, time.perf_counter()
        student = load(base_dir)
        loss = distill(student, [model_a, model_b], self.tok, (TASK_A, TASK_B),
                       weights=(0.5, 0.5),
                       config=DistillConfig(steps=c.distill.steps, lr=c.distill.lr,
                                            batch=c.batch, max_length=64,
                                            temperature=c.distill_temperature,
                                            seed=c.seed + 4),
                       exclude=self.excluded)
        self.save(student, "distilled")
        self.score("distilled", "distill", 0.5, student)
        self.log(f"distilled the base from the mixture (0.5 / 0.5) of both specialists on "
                 f"both tasks: {c.distill.steps} steps at temperature "
                 f"{c.distill_temperature:g}, final loss {loss:.4f}, "
                 f"{time.perf_counter() - t0:.1f} s")

    def write(self, result: DemoResult, choice: SweepChoice, plot: bool) -> None:
        """results.json, table.txt, sweep.txt and the plots (earlier ones removed)."""
        save_sweep(choice, self.out, plot)
        (self.out / "results.json").write_text(json.dumps(
            {"config": asdict(self.config), "seconds": result.seconds,
             "rows": [asdict(r) for r in self.rows],
             "sweep": {"mod": choice.mod.records(), "mixture": choice.mixture.records(),
                       "chosen": result.chosen}}, indent=2))
        (self.out / "table.txt").write_text(format_table(result) + "\n")
        (self.out / "accuracy.png").unlink(missing_ok=True)
        if plot:
            result.plot = save_plot(result, self.out / "accuracy.png", result.notes)


# ---------------------------------------------------------------- the whole run

def run_demo(out: Path, config: DemoConfig = DemoConfig(), *, threads: int | None = None,
             plot: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into folder `out` (created; existing demo files are overwritten)."""
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    old_threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per tiny load/save would drown the table
    if threads:
        torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        run = _Run(out, config, log)
        base_dir = run.base()
        a_dir, b_dir = run.specialists(base_dir)
        choice = choose_alphas(load(a_dir), load(b_dir), run.tok, run.validation, log)
        run.merges(a_dir, b_dir, choice.mod_alpha)
        model_a, model_b = load(a_dir), load(b_dir)
        run.mixtures(model_a, model_b, choice.mixture_alpha)
        run.distilled(base_dir, model_a, model_b)
        result = DemoResult(run.rows, out, config, time.perf_counter() - start,
                            chosen={"mod": choice.mod_alpha, "mixture": choice.mixture_alpha})
        result.notes.append(choice.summary())
        run.write(result, choice, plot)
        return result
    finally:
        torch.set_num_threads(old_threads)
        if bars:
            hf_logging.enable_progress_bar()


__all__ = ["DemoConfig", "DemoResult", "Row", "Stage", "run_demo", "format_table",
           "save_plot", "TASK_A", "TASK_B"]
