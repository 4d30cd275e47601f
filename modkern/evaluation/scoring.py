"""Built-in scorers for prompt/answer data (evaluation/data.py), for `modkern.sweep`:

- `loglik_scorer`: the mean log-likelihood of the answer tokens given the prompt
  (teacher-forced, batched): per task, the mean over all its answer tokens of
  log p(token | prompt, earlier answer tokens); `"mean"` is the mean over tasks.
- `exact_match_scorer`: the fraction of examples whose greedy continuation, cut to the
  answer's number of tokens, decodes to the answer (both stripped of surrounding spaces).

Both take an `EvalSet` (examples + tokenizer) and return a function of the model giving a
dict of floats (its `metric` attribute names the metric). Batches are left-padded with
explicit position ids (as transformers' generate pads), so every answer ends in the last
column and only the last columns' logits are computed (`logits_to_keep`, when the model
takes it). The model is a causal LM called
as `model(input_ids=, attention_mask=, position_ids=)` returning `.logits` (transformers').
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError, OptionError
from .data import MEAN, Example, read_prompt_answers, task_names, task_of

Scores = dict[str, float]


@dataclass
class Batch:
    """Left-padded token ids of a few examples (prompt + answer, or the prompt alone for
    generation) and where their answer tokens are."""

    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    answer_lengths: list[int]     # answer tokens of each example (the last columns)
    tasks: list[int]              # each example's task number
    examples: list[Example]

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, columns into the last K + 1 logits, token ids) of every answer token,
        K being the longest answer: the logit column that predicts each token."""
        longest = max(self.answer_lengths)
        width = self.input_ids.shape[1]
        rows, cols = [], []
        for i, n in enumerate(self.answer_lengths):
            rows += [i] * n
            cols += range(longest - n, longest)
        rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
        tokens = self.input_ids[rows_t, cols_t + width - longest]
        return rows_t, cols_t, tokens


@dataclass
class EvalSet:
    """Prompt/answer examples and the tokenizer both models share.

    batch_size: examples per forward. add_eos: also score the tokenizer's end-of-sequence
    token after each answer (a model that should stop right after the answer)."""

    examples: list[Example]
    tokenizer: Any
    batch_size: int = 16
    add_eos: bool = False
    _encoded: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise OptionError(f"EvalSet: batch_size must be a whole number >= 1 (examples "
                              f"per forward), got {size!r}")

    @classmethod
    def from_file(cls, path, tokenizer, **options) -> "EvalSet":
        """An EvalSet of a prompt/answer JSON Lines file (read_prompt_answers)."""
        return cls(read_prompt_answers(path), tokenizer, **options)

    @property
    def tasks(self) -> list[str]:
        """The examples' task names in order of first appearance, [] when no example names
        one (data.task_names: untagged examples then form a task of their own)."""
        return task_names(self.examples)

    def batches(self, with_answers: bool = True) -> list[Batch]:
        """The examples tokenized and left-padded, batch by batch (cached)."""
        if with_answers not in self._encoded:
            self._encoded[with_answers] = list(self._make_batches(with_answers))
        return self._encoded[with_answers]

    def _make_batches(self, with_answers: bool) -> Iterator[Batch]:
        tasks = self.tasks
        for start in range(0, len(self.examples), self.batch_size):
            chunk = self.examples[start:start + self.batch_size]
            prompts, answers = zip(*(self._tokens(e) for e in chunk))
            seqs = [p + a if with_answers else p for p, a in zip(prompts, answers)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id(self.tokenizer), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, width - len(s):] = torch.tensor(s)
                mask[i, width - len(s):] = 1
            numbers = [tasks.index(task_of(e, tasks)) if tasks else 0 for e in chunk]
            yield Batch(ids, mask, [len(a) for a in answers], numbers, list(chunk))

    def _tokens(self, example: Example) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        prompt = tok(example.prompt, add_special_tokens=True)["input_ids"]
        answer = tok(example.answer, add_special_tokens=False)["input_ids"]
        if self.add_eos:
            if tok.eos_token_id is None:
                raise DataError("add_eos: the tokenizer has no end-of-sequence token")
            answer = answer + [tok.eos_token_id]
        if not prompt:
            raise DataError(f"{example.where}: field \"prompt\" has no tokens; the first "
                            "answer token needs a prompt to follow")
        if not answer:
            raise DataError(f"{example.where}: field \"answer\" has no tokens")
        return prompt, answer


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token, else 0 (padding is
    masked out either way)."""
    for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token is not None:
            return token
    return 0


# --- log-likelihood ----------------------------------------------------------------------

def target_logits(model: torch.nn.Module, batch: Batch
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, V] that predict each of the batch's T answer tokens, the tokens [T],
    the task number of each [T]): one forward, computing only the last K + 1 columns' logits
    (K: the longest answer) when the model takes `logits_to_keep`."""
    rows, cols, tokens = batch.targets()
    keep = max(batch.answer_lengths) + 1
    device = model_device(model)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    out = model(input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device), **kwargs)
    logits = out.logits[:, -keep:]
    return logits[rows.to(device), cols.to(device)], tokens, torch.tensor(batch.tasks)[rows]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


class TaskTotals:
    """Sums and counts of per-token (or per-example) scores, per task."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        n = max(len(tasks), 1)
        # float64 counts: exact to 2**53 tokens (float32 stops counting at 2**24)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)

    def add(self, values: torch.Tensor, task_numbers: torch.Tensor) -> None:
        values = values.detach().double().cpu()
        self.sums.index_add_(0, task_numbers, values)
        self.counts.index_add_(0, task_numbers, torch.ones_like(values, dtype=self.counts.dtype))

    def scores(self) -> Scores:
        """{task: mean, ..., "mean": mean over tasks}, or {"mean": mean} without tasks."""
        means = (self.sums / self.counts.clamp(min=1)).tolist()
        if not self.tasks:
            return {MEAN: means[0]}
        out = dict(zip(self.tasks, means))
        out[MEAN] = sum(means) / len(means)
        return out


def token_logprobs(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's log-probability (of log-probabilities logp [T, V]) of its token."""
    return logp.gather(-1, tokens.to(logp.device)[:, None]).squeeze(-1)


def loglik_scorer(data: EvalSet) -> Callable[[torch.nn.Module], Scores]:
    """A scorer: the model's mean log-likelihood of the answer tokens (module docstring)."""
    def score(model: torch.nn.Module) -> Scores:
        totals = TaskTotals(data.tasks)
        with torch.no_grad():
            for batch in data.batches():
                logits, tokens, tasks = target_logits(model, batch)
                logp = torch.log_softmax(logits.float(), dim=-1)
                totals.add(token_logprobs(logp, tokens), tasks)
        return totals.scores()
    score.metric = "log-likelihood"
    return score


# --- exact match -------------------------------------------------------------------------

def exact_match_scorer(data: EvalSet) -> Callable[[torch.nn.Module], Scores]:
    """A scorer: the fraction of examples whose greedy continuation matches the answer
    (module docstring). The model must have transformers' `generate`."""
    tok = data.tokenizer

    def score(model: torch.nn.Module) -> Scores:
        totals = TaskTotals(data.tasks)
        device = model_device(model)
        for batch in data.batches(with_answers=False):
            with torch.no_grad():
                out = model.generate(input_ids=batch.input_ids.to(device),
                                     attention_mask=batch.attention_mask.to(device),
                                     max_new_tokens=max(batch.answer_lengths),
                                     do_sample=False, pad_token_id=pad_id(tok))
            new = out[:, batch.input_ids.shape[1]:].cpu()
            hits = [float(tok.decode(new[i, :n], skip_special_tokens=True).strip()
                          == e.answer.strip())
                    for i, (n, e) in enumerate(zip(batch.answer_lengths, batch.examples))]
            totals.add(torch.tensor(hits), torch.tensor(batch.tasks))
        return totals.scores()
    score.metric = "exact match"
    return score
