"""Prompt/response data for training, tokenised into right-padded batches whose labels
cover the response only. The examples are read by modkern.evaluation.data (one JSON object
per line: "prompt" and "response" or "answer", optional "task"; one-line errors).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..evaluation.data import Example, read_prompt_answers

IGNORE = -100  # label of a position the loss leaves out

__all__ = ["IGNORE", "Batch", "Example", "batches", "collate", "encode", "read_prompt_answers"]


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
    response = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
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
