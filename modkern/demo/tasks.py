"""The demo's tasks, and training and scoring tiny models on them.

Prompts and answers are short strings over a character vocabulary: digit addition
("57+8=" -> "65"), string reversal ("abcd=" -> "dcba") and, for pretraining the base,
copying ("ab3=" -> "ab3"). Scores are exact-match greedy accuracy on held-out prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .toy import EOS_ID

LETTERS = "abcdefgh"
ALPHABET = "0123456789+=" + LETTERS

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


# ---------------------------------------------------------------- data and training

def held_out(task: Task, n: int, seed: int,
             exclude: frozenset[str] | set[str] = frozenset()) -> list[Example]:
    """n distinct evaluation examples of `task`, none of whose prompts is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(100 * n):
        prompt, answer = task.make(rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
            if len(out) == n:
                break
    return out


def batch_of(vocab: dict[str, int], examples: Sequence[Example]):
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
        ids, mask, labels = batch_of(vocab, examples)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    return sum(tail) / len(tail)


def distill(student, teachers, tokenizer, tasks: Sequence[Task], *, weights, config,
            exclude: set[str] = frozenset()) -> float:
    """Train `student` towards the mixture (weights) of the `teachers`' next-token
    distributions on the answers of training prompts of every task in `tasks`, in equal
    shares, by modkern's fused distillation loss (forward KL at the temperature of
    `config`, a modkern.distill.train.DistillConfig). Returns the mean loss of the last
    20 steps."""
    from ..distill.data import Example as Pair
    from ..distill.models import check_head
    from ..distill.train import train as distill_train

    rng = random.Random(config.seed)
    pool = []
    while len(pool) < config.steps * config.batch // 2:  # each example seen about twice
        task = tasks[len(pool) % len(tasks)]
        prompt, answer = task.make(rng)
        if prompt not in exclude:
            pool.append(Pair(prompt, answer, task.name))
    heads = [check_head(f"teacher {i + 1}", t) for i, t in enumerate(teachers)]
    result = distill_train(check_head("student", student), heads, weights, tokenizer, pool,
                           config)
    return result.mean(False, 20)


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
