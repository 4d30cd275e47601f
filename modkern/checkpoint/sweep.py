"""The sweep over alpha on two checkpoint folders (`modkern sweep`): BASE is loaded as the
working model (transformers, in its stored dtype) and patched in place at each step; OTHER
is read only at the elements the lowest alpha selects, once (positioned reads of its
pages, as merge_checkpoints reads it), and BASE's file only where a step gives elements
back to BASE. Every step equals `merge_checkpoints(BASE, OTHER, OUT, alpha)` loaded,
bit for bit.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..merging.patterns import AlphaRule, Patterns
from ..ops.tensor_memory import view_key
from ..merging.sweep import MergeSweep, SweepInputs
from ..ops.select_source import ReaderSource
from .folder import Checkpoint, check_configs
from .job import check_checkpoint_keys, header_tensors, tensor_context


@dataclass
class CheckpointSweep:
    """An open checkpoint sweep: the working model (BASE, patched in place by `swept`),
    BASE's tokenizer, and both checkpoints (their readers count the bytes read)."""

    model: torch.nn.Module
    tokenizer: Any
    swept: MergeSweep
    ck1: Checkpoint
    ck2: Checkpoint


@contextmanager
def open_checkpoint_sweep(base: str | os.PathLike, other: str | os.PathLike,
                          rules: list[AlphaRule], *, include: Patterns = None,
                          exclude: Patterns = None, strict: bool = True,
                          precision: str = "exact", backend: str = "auto"
                          ) -> Iterator[CheckpointSweep]:
    """Open both checkpoints, load BASE as the working model and set up the sweep over
    `rules` (see MergeSweep); the same checks and errors as merge_checkpoints."""
    base_p, other_p = Path(base).absolute(), Path(other).absolute()
    with Checkpoint(base_p, "BASE") as ck1, Checkpoint(other_p, "OTHER", "random") as ck2:
        check_configs(ck1.config(), ck2.config(), base_p, other_p)
        sd1, sd2 = header_tensors(ck1), header_tensors(ck2)
        if strict:
            check_checkpoint_keys(ck1, ck2, sd1, sd2)
        model, tokenizer = load_base(base_p, stored_dtype(sd1))
        inputs = SweepInputs(
            sd1, sd2, working=working_tensors(model, sd1, base_p),
            source_of=lambda n: ReaderSource(ck2.where[n], n),
            original_of=lambda n: ReaderSource(ck1.where[n], n),
            context_of=lambda n: tensor_context(ck1, ck2, n), headers=True)
        with torch.no_grad():
            swept = MergeSweep(inputs, rules, include=include, exclude=exclude,
                               precision=precision, strict=False, backend=backend)
        yield CheckpointSweep(model, tokenizer, swept, ck1, ck2)


def stored_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most of a checkpoint's elements are stored in."""
    counts: Counter = Counter()
    for t in sd.values():
        if t.is_floating_point():
            counts[t.dtype] += t.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def load_base(folder: Path, dtype: torch.dtype):
    """BASE as a transformers causal LM in `dtype` (eval mode), and its tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"BASE {folder}: cannot load its tokenizer ({err}); expected "
                              "tokenizer files beside the weights to score with") from None
    return load_model(folder, dtype, "BASE"), tokenizer


def load_model(folder: Path, dtype: torch.dtype, label: str) -> torch.nn.Module:
    """A checkpoint folder as a transformers causal LM in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would interleave with the rows
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                     dtype=dtype)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{label} {folder}: cannot load it as a causal LM with "
                              f"transformers ({err})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def load_pair(base: str | os.PathLike, other: str | os.PathLike):
    """Both checkpoints whole, in their stored dtype (after the folder and config checks),
    and BASE's tokenizer: for the mixture, which runs both models."""
    base_p, other_p = Path(base).absolute(), Path(other).absolute()
    with Checkpoint(base_p, "BASE") as ck1, Checkpoint(other_p, "OTHER") as ck2:
        check_configs(ck1.config(), ck2.config(), base_p, other_p)
        dtypes = stored_dtype(header_tensors(ck1)), stored_dtype(header_tensors(ck2))
    model1, tokenizer = load_base(base_p, dtypes[0])
    return model1, load_model(other_p, dtypes[1], "OTHER"), tokenizer


def working_tensors(model: torch.nn.Module, sd1: dict[str, torch.Tensor],
                    folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensor of each floating-point tensor of BASE's files (patched in place),
    checked to hold it as stored: same dtype and shape, contiguous, not tied to another
    one of the files' tensors."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, meta in sd1.items():
        if not meta.is_floating_point():
            continue
        t = state.get(name)
        if t is None:
            raise CheckpointError(f"BASE {folder}: tensor {name!r} of its files is not a "
                                  "parameter or buffer of the model transformers loads; "
                                  "expected the checkpoint's own names")
        if t.dtype != meta.dtype or t.shape != meta.shape or not t.is_contiguous():
            raise CheckpointError(f"BASE {folder}: tensor {name!r} is stored as {meta.dtype} "
                                  f"{list(meta.shape)} but loaded as {t.dtype} "
                                  f"{list(t.shape)}; the sweep merges the stored tensors")
        key = view_key(t)
        if key in seen:
            raise CheckpointError(f"BASE {folder}: tensors {seen[key]!r} and {name!r} are "
                                  "stored apart but tied in the model; save BASE without "
                                  "the tied copy")
        seen[key] = name
        out[name] = t
    return out
