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
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .checkpoint import format_bytes
from .toy import char_tokenizer, tiny_causal_lm

LETTERS = "abcdefgh"
ALPHABET = "0123456789+=" + LETTERS
EOS_ID = 1

Example = tuple[str, str]  # (prompt, answer)


def addition(rng: random.Random) -> Example:
    a, b = rng.randrange(100), rng.randrange(10)
    return f"{a}+{b}=", str(a + b)


def reversal(rng: random.Random) -> Example:
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    return f"{s}=", s[::-1]


def copying(rng: random.Random) -> Example:
    """The base's pretraining task: repeat a string of digits, letters and '+'."""
    s = "".join(rng.choice("0123456789+" + LETTERS) for _ in range(rng.randint(2, 6)))
    return f"{s}=", s


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], Example]


TASK_A = Task("addition", addition)
TASK_B = Task("reversal", reversal)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules; `quick()` is the reduced run CI uses."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 300
    finetune_steps: int = 500
    batch: int = 64
    pretrain_lr: float = 3e-3
    finetune_lr: float = 3e-3
    eval_examples: int = 200
    alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoConfig":
        return cls(pretrain_steps=100, finetune_steps=300, eval_examples=64,
                   alphas=(0.1, 0.5, 0.9), seed=seed)


@dataclass
class Row:
    """One line of the demo table."""

    model: str
    method: str                  # base | specialist | mod | linear | mixture
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

    def row(self, model: str) -> Row:
        return next(r for r in self.rows if r.model == model)


# ---------------------------------------------------------------- data and training

def held_out(task: Task, n: int, seed: int) -> list[Example]:
    """n distinct evaluation examples of `task`."""
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(100 * n):
        prompt, answer = task.make(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
            if len(out) == n:
                break
    return out


def _batch(vocab: dict[str, int], examples: Sequence[Example]):
    """Right-padded ids, mask and labels; the loss covers the answer and <eos> only."""
    length = max(len(p) + len(a) + 1 for p, a in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (prompt, answer) in enumerate(examples):
        seq = [vocab[c] for c in prompt + answer] + [EOS_ID]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(prompt):len(seq)] = ids[i, len(prompt):len(seq)]
    return ids, mask, labels


def train(model, tokenizer, task: Task, *, steps: int, batch: int, lr: float, seed: int,
          exclude: set[str] = frozenset()) -> float:
    """AdamW on freshly drawn examples of `task` (never one whose prompt is in `exclude`),
    with a short warmup and linear decay. Returns the mean loss of the last 20 steps."""
    vocab = tokenizer.get_vocab()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1.0 - s / steps))
    model.train()
    losses = []
    for _ in range(steps):
        examples = []
        while len(examples) < batch:
            ex = task.make(rng)
            if ex[0] not in exclude:
                examples.append(ex)
        ids, mask, labels = _batch(vocab, examples)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)


# ---------------------------------------------------------------- evaluation

def _max_new(examples: Sequence[Example]) -> int:
    return max(len(a) for _, a in examples) + 1  # the answer and <eos>


def greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Batched greedy continuations of one model (left padding)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=EOS_ID)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def accuracy(predicted: Sequence[str], examples: Sequence[Example]) -> float:
    """Exact match of the whole continuation (it must stop right after the answer)."""
    return sum(p == a for p, (_, a) in zip(predicted, examples)) / len(examples)


def score(decode: Callable[[list[str], int], list[str]],
          evals: dict[str, list[Example]]) -> dict[str, float]:
    return {name: accuracy(decode([p for p, _ in exs], _max_new(exs)), exs)
            for name, exs in evals.items()}


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
    from .checkpoint import merge_checkpoints

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

    from .generation import generate as mixture_generate

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
        excluded = {p for exs in evals.values() for p, _ in exs}
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

        t0 = time.perf_counter()
        for method, merge in (("mod", mod_merge_checkpoint),
                              ("linear", linear_merge_checkpoint)):
            for alpha in config.alphas:
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
        for alpha in config.alphas:
            acc = score(lambda prompts, n, alpha=alpha: mixture_generate(
                model_a, model_b, tok, prompts, alpha, max_new_tokens=n), evals)
            rows.append(Row(f"mixture-{alpha:g}", "mixture", alpha, acc))
        log(f"decoded with the mixture of both specialists, {time.perf_counter() - t0:.1f} s")

        result = DemoResult(rows, out, config, time.perf_counter() - start)
        (out / "results.json").write_text(json.dumps(
            {"config": asdict(config), "seconds": result.seconds,
             "rows": [asdict(r) for r in rows]}, indent=2))
        (out / "table.txt").write_text(format_table(result) + "\n")
        (out / "accuracy.png").unlink(missing_ok=True)  # never leave an earlier run's plot
        if plot:
            result.plot = save_plot(result, out / "accuracy.png", result.notes)
        return result
    finally:
        torch.set_num_threads(old_threads)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------- reporting

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
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = {"mod": ("MoD merge", "o-"), "linear": ("linear merge", "s--"),
              "mixture": ("mixture decoding", "^:")}
    for ax, task in zip(axes, (TASK_A.name, TASK_B.name)):
        for method, (label, style) in styles.items():
            pts = sorted((r.alpha, r.accuracy[task]) for r in result.rows if r.method == method)
            ax.plot([a for a, _ in pts], [y for _, y in pts], style, label=label)
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
    axes[1].legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["DemoConfig", "DemoResult", "Row", "run_demo", "format_table", "save_plot",
           "TASK_A", "TASK_B"]
