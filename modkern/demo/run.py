"""MoD end to end on a laptop CPU, with nothing downloaded: the machinery of `modkern demo`.

1. Build a tiny Qwen2 model (seeded) with a character-level tokenizer and pretrain it
   briefly on copying strings ("ab3=ab3"): the common base.
2. Fine-tune two copies of the base, one on digit addition ("57+8=65"), one on string
   reversal ("abcd=dcba"), and save both as Hugging Face checkpoints (safetensors).
3. Merge the two checkpoints by MoD weight select at a few alphas, and by a plain linear
   average alpha*A + (1-alpha)*B for comparison, each written as a checkpoint.
4. Decode with the mixture of the two specialists' distributions at the same alphas.
5. Score every model by exact-match greedy accuracy on held-out prompts of both tasks.

Everything is seeded: a run with the same options and thread count prints the same table.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..distill.train import DistillConfig
from .report import DemoResult, Row, format_table, save_plot
from .sweep_step import choose_alphas, save_sweep, validation_split
from .tasks import (ALPHABET, TASK_A, TASK_B, Task, copying, distill, greedy, held_out, score,
                    train)
from .toy import char_tokenizer, tiny_causal_lm


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules; `quick()` is the reduced run CI uses."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 300
    finetune_steps: int = 500
    distill_steps: int = 600
    distill_lr: float = 1e-2
    # Softened teachers learn better here (seed 0, 600 steps, accuracy on addition /
    # reversal): lr 3e-3: 0.19 / 0.11 at T = 1, 0.41 / 0.27 at T = 3; lr 1e-2: 0.54 / 0.40
    # at T = 3, 0.55 / 0.44 at T = 4.
    distill_temperature: float = 4.0
    batch: int = 64
    pretrain_lr: float = 3e-3
    finetune_lr: float = 3e-3
    eval_examples: int = 200
    alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        return cls(pretrain_steps=100, finetune_steps=300, distill_steps=150, eval_examples=64,
                   alphas=(0.1, 0.5, 0.9), seed=seed)


# ---------------------------------------------------------------- merging checkpoints

def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def mod_merge_checkpoint(a: Path, b: Path, out: Path, alpha: float) -> Row:
    """MoD merge of checkpoint folders `a` (base, model 1) and `b` into `out` by
    `merge_checkpoints` (the path `modkern merge` takes); a Row of its counts, no accuracy."""
    from ..checkpoint.merge import merge_checkpoints

    report = merge_checkpoints(a, b, out, alpha, progress=False)
    return Row(out.name, "mod", alpha, {}, elements_taken=report.elements_taken,
               elements_merged=report.elements_merged, bytes_read_a=report.bytes_read_base,
               bytes_read_b=report.bytes_read_other, seconds=report.seconds)


def linear_merge_checkpoint(a: Path, b: Path, out: Path, alpha: float) -> Row:
    """alpha * A + (1 - alpha) * B for every floating-point tensor, written to `out`."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    sd_a = load_file(str(a / "model.safetensors"))
    sd_b = load_file(str(b / "model.safetensors"))
    merged, elements = {}, 0
    for key, t in sd_a.items():
        if t.is_floating_point():
            merged[key] = (alpha * t.double() + (1 - alpha) * sd_b[key].double()).to(t.dtype)
            elements += t.numel()
        else:
            merged[key] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(a, out)
    return Row(out.name, "linear", alpha, {}, elements_merged=elements,
               bytes_read_a=_file_bytes(a), bytes_read_b=_file_bytes(b),
               seconds=time.perf_counter() - start)


def _clear(folder: Path) -> None:
    """Remove a previous run's output folder of the same name (run_demo's own files)."""
    if folder.is_dir():
        shutil.rmtree(folder)


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                dtype=torch.float32).eval()


# ---------------------------------------------------------------- the whole run

def run_demo(out: Path, config: DemoConfig = DemoConfig(), *, threads: int | None = None,
             plot: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo into folder `out` (created; existing demo files are overwritten)."""
    from transformers.utils import logging as hf_logging

    from ..decoding.generation import generate as mixture_generate

    start = time.perf_counter()
    old_threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per tiny load/save would drown the table
    if threads:
        torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tok = char_tokenizer(ALPHABET)
        evals = {t.name: held_out(t, config.eval_examples, seed=10_000 + i)
                 for i, t in enumerate((TASK_A, TASK_B))}
        validation = validation_split((TASK_A, TASK_B), max(16, config.eval_examples // 2))
        excluded = {p for exs in evals.values() for p, _ in exs} | \
            {e.prompt for e in validation}
        rows: list[Row] = []

        def decode_with(model):
            return lambda prompts, n: greedy(model, tok, prompts, n)

        def save(model, name: str) -> Path:
            folder = out / name
            _clear(folder)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            return folder

        t0 = time.perf_counter()
        base = tiny_causal_lm(len(tok), hidden=config.hidden, layers=config.layers,
                              heads=config.heads, kv_heads=max(1, config.heads // 2),
                              seed=config.seed)
        loss = train(base, tok, Task("copying", copying), steps=config.pretrain_steps,
                     batch=config.batch, lr=config.pretrain_lr, seed=config.seed + 1,
                     exclude=excluded)
        base_dir = save(base, "base")
        log(f"pretrained the base on copying: {config.pretrain_steps} steps, "
            f"final loss {loss:.3f}, {time.perf_counter() - t0:.1f} s")
        rows.append(Row("base", "base", None, score(decode_with(base), evals)))

        specialists = {}
        for i, task in enumerate((TASK_A, TASK_B)):
            t0 = time.perf_counter()
            model = load(base_dir)
            loss = train(model, tok, task, steps=config.finetune_steps, batch=config.batch,
                         lr=config.finetune_lr, seed=config.seed + 2 + i, exclude=excluded)
            name = f"specialist-{task.name}"
            specialists[task.name] = save(model, name)
            log(f"fine-tuned {name}: {config.finetune_steps} steps, "
                f"final loss {loss:.3f}, {time.perf_counter() - t0:.1f} s")
            rows.append(Row(name, "specialist", None, score(decode_with(model), evals)))
        a_dir, b_dir = specialists[TASK_A.name], specialists[TASK_B.name]
        choice = choose_alphas(load(a_dir), load(b_dir), tok, validation, log)

        t0 = time.perf_counter()
        for method, merge in (("mod", mod_merge_checkpoint),
                              ("linear", linear_merge_checkpoint)):
            chosen = (choice.mod_alpha,) if method == "mod" else ()
            for alpha in sorted(set(config.alphas) | set(chosen)):
                folder = out / f"{method}-{alpha:g}"
                _clear(folder)
                row = merge(a_dir, b_dir, folder, alpha)
                row.accuracy = score(decode_with(load(folder)), evals)
                rows.append(row)
        log(f"merged the specialists by MoD and linearly at alpha = "
            f"{', '.join(f'{a:g}' for a in config.alphas)} and scored the merges, "
            f"{time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        model_a, model_b = load(a_dir), load(b_dir)
        for alpha in sorted(set(config.alphas) | {choice.mixture_alpha}):
            acc = score(lambda prompts, n, alpha=alpha: mixture_generate(
                model_a, model_b, tok, prompts, alpha, max_new_tokens=n), evals)
            rows.append(Row(f"mixture-{alpha:g}", "mixture", alpha, acc))
        log(f"decoded with the mixture of both specialists, {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        student = load(base_dir)
        loss = distill(student, [model_a, model_b], tok, (TASK_A, TASK_B), weights=(0.5, 0.5),
                       config=DistillConfig(steps=config.distill_steps, lr=config.distill_lr,
                                            batch=config.batch, max_length=64,
                                            temperature=config.distill_temperature,
                                            seed=config.seed + 4),
                       exclude=excluded)
        save(student, "distilled")
        rows.append(Row("distilled", "distill", 0.5, score(decode_with(student), evals)))
        log(f"distilled the base from the mixture (0.5 / 0.5) of both specialists on both "
            f"tasks: {config.distill_steps} steps at temperature "
            f"{config.distill_temperature:g}, final loss {loss:.4f}, "
            f"{time.perf_counter() - t0:.1f} s")

        result = DemoResult(rows, out, config, time.perf_counter() - start,
                            chosen={"mod": choice.mod_alpha, "mixture": choice.mixture_alpha})
        result.notes.append(choice.summary())
        save_sweep(choice, out, plot)
        (out / "results.json").write_text(json.dumps(
            {"config": asdict(config), "seconds": result.seconds,
             "rows": [asdict(r) for r in rows],
             "sweep": {"mod": choice.mod.records(), "mixture": choice.mixture.records(),
                       "chosen": result.chosen}}, indent=2))
        (out / "table.txt").write_text(format_table(result) + "\n")
        (out / "accuracy.png").unlink(missing_ok=True)  # never leave an earlier run's plot
        if plot:
            result.plot = save_plot(result, out / "accuracy.png", result.notes)
        return result
    finally:
        torch.set_num_threads(old_threads)
        if bars:
            hf_logging.enable_progress_bar()


__all__ = ["DemoConfig", "DemoResult", "Row", "run_demo", "format_table", "save_plot",
           "TASK_A", "TASK_B"]
