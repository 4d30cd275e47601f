"""Training a student towards the mixture of its teachers' next-token distributions.

Each step: the student's last hidden states and lm_head go into `fused_linear_mixture_kd`
with each teacher's (last hidden states, lm_head) computed without gradient, on the rows
whose next token is a response token; AdamW with a linear warmup and decay, gradient
clipping. Neither the student's nor any teacher's [tokens, V] logits are ever built.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..ops.mixture_kd import fused_linear_mixture_kd
from .data import Batch, Example, batches, collate
from .models import Head


@dataclass(frozen=True)
class DistillConfig:
    """The schedule and loss of a distillation run."""

    steps: int | None = None        # None: one pass over the data
    lr: float = 2e-5
    batch: int = 8
    max_length: int = 512
    temperature: float = 1.0
    kind: str = "forward_kl"
    seed: int = 0
    warmup: float = 0.05            # fraction of the steps
    max_grad_norm: float = 1.0      # 0: no clipping
    weight_decay: float = 0.0
    log_every: int | None = None    # None: about ten loss lines per run

    def total_steps(self, examples: int) -> int:
        return self.steps if self.steps is not None else max(1, math.ceil(examples /
                                                                         self.batch))


def distill_loss(student: Head, teachers: Sequence[Head], weights: Sequence[float],
                 batch: Batch, config: DistillConfig) -> torch.Tensor:
    """The loss of one batch: position i's distribution against the teachers' mixture
    there, for every i whose next token is a response token."""
    ids, mask = batch.input_ids, batch.attention_mask
    hidden = student.hidden(ids, mask)[:, :-1]
    with torch.no_grad():
        pairs = []
        for t in teachers:
            th = t.hidden(ids, mask)[:, :-1]
            pairs.append((th, t.weight) if t.bias is None else (th, t.weight, t.bias))
    return fused_linear_mixture_kd(hidden, student.weight, pairs, weights, bias=student.bias,
                                   mask=batch.labels[:, 1:], temperature=config.temperature,
                                   kind=config.kind)


@dataclass
class TrainResult:
    losses: list[float]
    seconds: float
    target_tokens: int

    def mean(self, first: bool, n: int = 10) -> float:
        part = self.losses[:n] if first else self.losses[-n:]
        return sum(part) / len(part)


def train(student: Head, teachers: Sequence[Head], weights: Sequence[float], tokenizer,
          examples: Sequence[Example], config: DistillConfig, *, device="cpu",
          progress: bool = False, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run the distillation; the student is trained in place and left in eval mode."""
    steps = config.total_steps(len(examples))
    torch.manual_seed(config.seed)
    params = [p for p in student.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))
    every = config.log_every or max(1, steps // 10)
    for t in teachers:
        t.model.eval()
    student.model.train()
    source = batches(examples, config.batch, config.seed)
    losses, tokens, start = [], 0, time.perf_counter()
    bar = _bar(steps, progress)
    try:
        for step in range(1, steps + 1):
            batch = collate(tokenizer, next(source), config.max_length).to(device)
            loss = distill_loss(student, teachers, weights, batch, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
            tokens += batch.target_tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if log is not None and (step % every == 0 or step == steps):
                recent = losses[-every:]
                line = (f"step {step}/{steps}: loss {sum(recent) / len(recent):.4f}, "
                        f"lr {sched.get_last_lr()[0]:.2e}, "
                        f"{tokens / (time.perf_counter() - start):.0f} target tokens/s")
                if bar is not None:
                    bar.write(line)  # above the bar, not through it
                else:
                    log(line)
    finally:
        if bar is not None:
            bar.close()
        student.model.eval()
    return TrainResult(losses, time.perf_counter() - start, tokens)


def _bar(steps: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc="distill", unit="step", dynamic_ncols=True)
