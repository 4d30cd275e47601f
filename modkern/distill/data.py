"""Prompt/response data for training and scoring: jsonl read with one-line errors, and
tokenised into right-padded batches whose labels cover the response only.

One JSON object per line: {"prompt": str, "response": str} ("answer" is accepted for
"response"), with an optional "task" (str) that scorers group by. Blank lines are skipped.
A malformed line or field raises DataError naming `file:line` and what was expected.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModkernError

TARGET_FIELDS = ("response", "answer")
IGNORE = -100  # label of a position the loss leaves out


class DataError(ModkernError, ValueError):
    """A data file (jsonl) that cannot be read, or a line of it that is malformed."""


@dataclass(frozen=True)
class Example:
    """One prompt and its target; `where` is "file:line" for messages."""

    prompt: str
    response: str
    task: str | None = None
    where: str = ""


def _field(obj: dict, name: str, where: str, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}; expected an object with "
                            "'prompt' and 'response' (or 'answer') strings")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got "
                        f"{type(value).__name__}")
    return value


def parse_line(line: str, where: str) -> Example | None:
    """The example on one jsonl line (None for a blank line); DataError if malformed."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    present = [f for f in TARGET_FIELDS if obj.get(f) is not None]
    if len(present) > 1:
        raise DataError(f"{where}: both 'response' and 'answer' given; expected one")
    prompt = _field(obj, "prompt", where)
    response = _field(obj, present[0] if present else "response", where)
    return Example(prompt, response, _field(obj, "task", where, required=False), where)


def read_jsonl(path: str | Path) -> list[Example]:
    """Every example of a jsonl file, in order; DataError naming file:line otherwise."""
    path = Path(path)
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                example = parse_line(line, f"{path}:{number}")
                if example is not None:
                    examples.append(example)
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not examples:
        raise DataError(f"{path}: no examples; expected jsonl lines with 'prompt' and "
                        "'response'")
    return examples


@dataclass
class Batch:
    """Right-padded token ids [B, L], attention mask [B, L] and labels [B, L] (IGNORE
    outside the response and its end-of-sequence token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device))


def encode(tokenizer, example: Example, max_length: int) -> tuple[list[int], int]:
    """(token ids of prompt + response + eos, number of prompt tokens), cut to
    max_length. The prompt and response are tokenised separately, so the boundary is
    exact."""
    prompt = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = list(prompt) + list(response) + eos
    return ids[:max_length], min(len(prompt), max_length)


def collate(tokenizer, examples: Sequence[Example], max_length: int) -> Batch:
    """Encode and right-pad a batch (pad id: the tokenizer's, else 0)."""
    encoded = [encode(tokenizer, ex, max_length) for ex in examples]
    length = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (seq, n_prompt) in enumerate(encoded):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, n_prompt:len(seq)] = ids[i, n_prompt:len(seq)]
    return Batch(ids, mask, labels)


def batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless batches: the examples shuffled (seeded) each pass, cut into batch_size."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if len(chunk) < batch_size and len(order) >= batch_size:
                chunk += order[:batch_size - len(chunk)]  # equal batches: top up the tail
            yield [examples[i] for i in chunk]
