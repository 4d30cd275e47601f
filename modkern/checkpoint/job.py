"""A checkpoint merge made ready: `open_merge` checks everything that can be checked
without tensor data and plans the output; the `MergeJob` it yields merges BASE's tensors
one by one (or a row block of one) through the select pipeline, reading OTHER only at the
selected elements, and writes the folder's other files (config, tokenizer, recipe, card).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import ModkernError
from ..merging.patterns import exact_pattern, name_filter
from ..merging.plan import alphas, check_keys, names_to_merge
from ..ops.select_context import SelectContext
from ..ops.select_engine import SelectEngine, engine_for
from ..ops.select_pipeline import select_flat
from ..ops.select_source import ReaderSource
from . import publish, recipe as recipe_io
from .folder import Checkpoint, check_configs
from .options import MergeOptions, parse_path
from .out_folder import (COPIED, check_out_path, check_space, copy_base_files, out_path,
                         write_file)
from .prefetch import prefetched
from .report import MergeReport
from .shard_writer import PlannedTensor, plan_shards
from .staging import Staged, Staging


@dataclass
class MergeJob:
    """A validated, planned merge with both checkpoints open (made by `open_merge`): what
    every process of a merge needs, whether it writes the whole output or a part of it."""

    base: Path
    other: Path
    out: Path
    options: MergeOptions
    ck1: Checkpoint
    ck2: Checkpoint
    engine: SelectEngine            # runs the selects on options.device
    plan: dict[str, float]          # merged tensors -> alpha; the others are copied
    planned: list[PlannedTensor]    # every output tensor, in BASE's file order
    shards: list                    # the output's shard plan (shard_writer.Shard)
    copied: list[str]               # BASE's files copied beside the weights
    staging: Staging                # host<->device copies for options.device

    def new_report(self) -> MergeReport:
        return MergeReport(out=self.out, bytes_base=self.ck1.weight_bytes,
                           bytes_other=self.ck2.weight_bytes)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """The output dtype (--dtype) applied to a merged or copied tensor."""
        out_dtype = self.options.dtype
        if out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype:
            return t.to(out_dtype)
        return t

    def context(self, name: str, first: int = 0) -> SelectContext:
        """Names tensor `name` (its part from flat index `first`) and its files in errors."""
        return tensor_context(self.ck1, self.ck2, name).block(first)

    def source(self, name: str, first: int = 0) -> ReaderSource:
        """OTHER's tensor `name` (its part from flat index `first`), read where selected."""
        return ReaderSource(self.ck2.where[name], name, first)

    def on_device(self, t1: torch.Tensor) -> torch.Tensor:
        """t1 (contiguous, on the CPU) as a 1-D tensor on the merge's device (t1 itself on
        the CPU; a copy on a GPU)."""
        return self.staging.on_device(self.staging.stage(t1))

    def base_tensors(self, names: list[str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor | Staged]]:
        """BASE's tensors (all, or `names`) in file order, read ahead (prefetch.prefetched);
        those to merge already on their way to the merge's device, copied by the thread
        that read them while the tensor before is merged."""
        def stage(name: str, t1: torch.Tensor) -> torch.Tensor | Staged:
            return self.staging.stage(t1) if name in self.plan else t1

        return prefetched(self.ck1, names, pinned=self.staging.pinned, then=stage)

    def merge_one(self, name: str, t1: torch.Tensor | Staged, report: MergeReport
                  ) -> torch.Tensor:
        """BASE's whole tensor `name` (read, on the CPU; or as `base_tensors` staged it) ->
        the output tensor (on the CPU, in t1's buffer unless cast), counted in `report`."""
        host = t1.host if isinstance(t1, Staged) else t1
        if name not in self.plan:
            report.carry()
            return self.cast(host)
        flat = self.staging.on_device(t1 if isinstance(t1, Staged) else self.staging.stage(t1))
        result = select_flat(flat[:self.merged_numel(name)], self.source(name),
                             self.plan[name], precision=self.options.precision,
                             engine=self.engine, context=self.context(name))
        report.add(name, result)
        return self.cast(self.staging.to_host(flat, host))

    def merged_numel(self, name: str) -> int:
        """How many leading elements of BASE's tensor `name` are merged: all of them, or
        with vocab="common" those of the rows OTHER has too (BASE's further rows are kept);
        the flat index of an element is the same in both files."""
        i1, i2 = self.ck1.info(name), self.ck2.info(name)
        if i1.shape == i2.shape:
            return i1.numel
        return min(i1.shape[0], i2.shape[0]) * (i1.numel // max(i1.shape[0], 1))

    def finish_folder(self, tmp: Path, report: MergeReport) -> None:
        """Everything but the weights: config and tokenizer from BASE, the recipe, the
        model card (the index is written with the shards)."""
        full_hash = self.options.full_hash
        inputs = {"base": recipe_io.describe_input(self.ck1, self.copied, full_hash),
                  "other": recipe_io.describe_input(self.ck2, self.copied, full_hash)}
        copy_base_files(self.base, tmp, self.copied, self.options.dtype)
        record = recipe_record(self, report, inputs)
        recipe_io.write_recipe(tmp, record)
        write_file(tmp / "README.md",
                   [recipe_io.model_card(self.base, self.other, record).encode("utf-8")])


def tensor_context(ck1: Checkpoint, ck2: Checkpoint, name: str) -> SelectContext:
    return SelectContext(name, files=(ck1.where[name].path, ck2.where[name].path))


def recipe_record(job: MergeJob, report: MergeReport, inputs: dict) -> dict:
    """The recipe file's content: the inputs, the options that decide the weights, and the
    counts of the report."""
    options = job.options
    exclude = options.exclude
    if callable(options.alpha) and not isinstance(options.alpha, Mapping):
        # a function is recorded as its values: per merged tensor an exact-name pattern,
        # and the tensors it left unmerged join `exclude`, so the recipe reruns as is
        skipped = [exact_pattern(n) for n in job.ck1.names() if job.plan.get(n) is None]
        exclude = (exclude or []) + skipped if skipped else exclude
    record = {
        "modkern_version": __version__,
        "method": "mod-weight-select",
        "inputs": inputs,
        "alpha": recipe_io.alpha_record(options.alpha, job.plan),
        "include": options.include,
        "exclude": exclude,
        "precision": options.precision,
        "strict": options.strict,
        "vocab": options.vocab,
        "dtype": None if options.dtype is None else str(options.dtype).removeprefix("torch."),
        "max_shard_size": options.max_shard_size,
        "hashes": "sha256 of whole files" if options.full_hash else
                  "weight files: sha256 of the safetensors header + size; others: sha256",
        "result": {k: v for k, v in asdict(report).items()
                   if k not in ("out", "taken_by_key", "seconds")},
    }
    common = {n: min(job.ck1.info(n).shape[0], job.ck2.info(n).shape[0]) for n in job.plan
              if job.ck1.info(n).shape != job.ck2.info(n).shape}
    if common:  # vocab="common": the rows merged, BASE's further rows kept as they were
        record["common_rows"] = common
    if options.extra_recipe:
        record["source"] = dict(options.extra_recipe)
    return record


@contextmanager
def open_merge(base: str | os.PathLike, other: str | os.PathLike, out: str | os.PathLike,
               options: MergeOptions) -> Iterator[MergeJob]:
    """Check everything that can be checked without tensor data (folders, headers, keys,
    shapes, dtypes, alpha per tensor, output path, disk space; the options were checked
    when made), plan the output shards, and yield a MergeJob with both checkpoints open."""
    base_p = parse_path(base, "BASE").absolute()
    other_p = parse_path(other, "OTHER").absolute()
    out_p = out_path(parse_path(out, "OUT"))
    publish.remove_stale(out_p)  # first: it may restore the OUT a killed swap left aside
    check_out_path(base_p.resolve(), other_p.resolve(), out_p.resolve(), options.force)

    with Checkpoint(base_p, "BASE", "sequential") as ck1, \
            Checkpoint(other_p, "OTHER", "random") as ck2:
        check_configs(ck1.config(), ck2.config(), base_p, other_p, options.vocab)
        plan = _plan(ck1, ck2, options)
        out_dtype = options.dtype
        planned = [PlannedTensor(n, out_dtype if out_dtype is not None and
                                 i.dtype.is_floating_point else i.dtype, i.shape)
                   for n, i in ck1.items()]
        shards = plan_shards(planned, options.max_shard_size)
        copied = [f for f in COPIED if (base_p / f).is_file()]
        needed = sum(s.nbytes + len(s.header()) for s in shards) + \
            sum((base_p / f).stat().st_size for f in copied) + (1 << 20)
        check_space(out_p, needed)
        staging = Staging(options.device)
        with staging.current_device():
            yield MergeJob(base=base_p, other=other_p, out=out_p, options=options, ck1=ck1,
                           ck2=ck2, engine=engine_for(options.resolved_backend), plan=plan,
                           planned=planned, shards=shards, copied=copied, staging=staging)


def _plan(ck1: Checkpoint, ck2: Checkpoint, options: MergeOptions) -> dict[str, float]:
    """The tensors to merge and their alpha, from the headers (every pair checked)."""
    sd1, sd2 = header_tensors(ck1), header_tensors(ck2)
    if options.strict:
        check_checkpoint_keys(ck1, ck2, sd1, sd2)

    def context_of(name: str) -> SelectContext:
        return tensor_context(ck1, ck2, name)

    names = names_to_merge(sd1, sd2, name_filter(options.include, options.exclude),
                           context_of, need_data=False, vocab=options.vocab)
    return alphas(options.alpha, names, context_of)


def header_tensors(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as meta tensors (dtype and shape, no data), by name."""
    return {n: i.meta() for n, i in ck.items()}


def check_checkpoint_keys(ck1: Checkpoint, ck2: Checkpoint, sd1: Mapping, sd2: Mapping) -> None:
    """KeyMismatchError naming both folders when the checkpoints' tensor names differ."""
    try:
        check_keys(sd1, sd2)
    except ModkernError as err:
        raise type(err)(f"BASE {ck1.folder} vs OTHER {ck2.folder}: {err}".replace(
            "pass strict=False", "pass --no-strict / strict=False")) from None
