"""`merge_checkpoints`: MoD weight select from checkpoint folder to checkpoint folder,
streaming tensor by tensor and reading the other model only where it is selected.

For each tensor of BASE, in file order: read it whole (one positioned read), take its min
and max, and compute the exact threshold v of select_reference.select_threshold. The
elements that come from OTHER are exactly those with `t1 >= v`, so only the pages of
OTHER's tensor that hold them are read (at alpha 0.9 about 2% of OTHER's pages on
N(0, 0.02) weights). The patched tensor is appended to the output shard being written; the
shards' layout is planned from the headers beforehand, so memory stays at about the largest
tensor. Everything that can be checked without tensor data (folders, shards, headers, keys,
shapes, dtypes, alpha rules, output path, disk space) is checked before anything is written;
the output is built in a temporary folder beside OUT and renamed into place when complete.
The result equals `merge_state_dicts` on the two loaded state dicts, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..checks import check_precision
from ..errors import BackendError, ModkernError, NonFiniteError
from ..merging.patterns import AlphaRule, Patterns, check_alpha_rule, exact_pattern, \
    name_filter, pattern_list
from ..merging.state_dict import _plan, check_keys
from ..ops.select_reference import select_threshold
from ..ops.select_torch import selected_indices
from . import publish, recipe as recipe_io
from .folder import Checkpoint, check_configs
from .options import parse_device, parse_dtype
from .out_folder import (COPIED, check_out_path, check_space, copy_base_files, make_parent,
                         out_path, write_file)
from .report import MergeReport
from .shard_writer import (BackgroundWriter, PlannedTensor, ShardWriter, parse_size,
                           plan_shards)

# Buffers BASE's tensors are read into: one being read, one merged, one written.
_RING = 3
# Test hook: seconds to sleep after writing each tensor (lets a test kill a merge mid-way).
_SLOW_ENV = "MODKERN_TEST_WRITE_DELAY"


def _nonfinite_t1(flat: torch.Tensor, file: Path, name: str, first: int = 0
                  ) -> NonFiniteError:
    """`flat` holds the tensor's elements from flat index `first` on (a row block)."""
    bad = int(torch.nonzero(~torch.isfinite(flat))[0])
    return NonFiniteError(f"BASE {file}: tensor {name!r} has a non-finite value "
                          f"{flat[bad].item()} at flat index {bad + first}; expected finite "
                          "weights")


def _nonfinite_t2(vals: torch.Tensor, idx: torch.Tensor, file: Path, name: str,
                  first: int = 0) -> NonFiniteError:
    k = int(torch.nonzero(~torch.isfinite(vals))[0])
    return NonFiniteError(f"OTHER {file}: tensor {name!r} has a non-finite value "
                          f"{vals[k].item()} at flat index {int(idx[k]) + first}, where the "
                          "merge takes OTHER's weight; expected finite weights")


def checked_minmax(flat: torch.Tensor, file: Path, name: str, first: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max of BASE's `flat` (a whole tensor, or its block from flat index `first`),
    or the NonFiniteError naming the file, tensor and index (NaN propagates to min/max)."""
    mn, mx = torch.aminmax(flat)
    if not bool(torch.isfinite(mn) & torch.isfinite(mx)):
        raise _nonfinite_t1(flat.cpu(), file, name, first)
    return mn, mx


def _merge_flat(flat: torch.Tensor, read_other: Callable[[torch.Tensor], torch.Tensor],
                alpha: float, precision: str, files: tuple[Path, Path], name: str) -> int:
    """Patch the contiguous 1-D `flat` (t1, on the CPU or a GPU) in place with OTHER's
    elements where selected; return how many. The steps of modkern.mod_select (min/max,
    exact threshold, take where t1 >= v), with OTHER read only at the selected indices."""
    if flat.numel() == 0:
        return 0
    mn, mx = checked_minmax(flat, files[0], name)
    return patch_from_other(flat, select_threshold(mn, mx, alpha, precision), read_other,
                            files, name)


def patch_from_other(flat: torch.Tensor, v: torch.Tensor,
                     read_other: Callable[[torch.Tensor], torch.Tensor],
                     files: tuple[Path, Path], name: str, first: int = 0) -> int:
    """Replace the elements `>= v` of `flat` (finite, contiguous; a whole tensor or the block
    of it that starts at flat index `first`) by OTHER's, read with `read_other(indices in
    flat)`; return how many. v is select_threshold of the whole tensor's min and max."""
    idx = selected_indices(flat, v).cpu()
    vals = read_other(idx).to(flat.dtype)
    if not bool(torch.isfinite(vals).all()):
        raise _nonfinite_t2(vals, idx, files[1], name, first)
    flat[idx.to(flat.device)] = vals.to(flat.device)
    return idx.numel()


def _merge_on(t1: torch.Tensor, read_other: Callable[[torch.Tensor], torch.Tensor],
              alpha: float, precision: str, files: tuple[Path, Path], name: str,
              device: torch.device) -> tuple[torch.Tensor, int]:
    """Merge t1 (read, contiguous, on the CPU) on `device`; return the merged tensor on the
    CPU and the number of elements taken. On a GPU the selection runs there (t1 is copied
    over: its CPU buffer is reused for a later tensor)."""
    if device.type == "cpu":
        return t1, _merge_flat(t1.view(-1), read_other, alpha, precision, files, name)
    flat = t1.to(device).view(-1)
    taken = _merge_flat(flat, read_other, alpha, precision, files, name)
    return flat.view(t1.shape).cpu(), taken


def _merge_tensor(name: str, t1: torch.Tensor, ck1: Checkpoint, ck2: Checkpoint, alpha: float,
                  precision: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """Merge one tensor of BASE (read, on the CPU) with OTHER's, read only where selected.
    Returns the merged tensor and the number of elements taken from OTHER."""
    reader = ck2.where[name]

    def read_other(idx: torch.Tensor) -> torch.Tensor:
        return reader.read_elements(name, idx)

    return _merge_on(t1, read_other, alpha, precision, (ck1.where[name].path, reader.path),
                     name, device)


def merge_checkpoints(base: str | os.PathLike, other: str | os.PathLike,
                      out: str | os.PathLike, alpha: AlphaRule, *, include: Patterns = None,
                      exclude: Patterns = None, strict: bool = True, precision: str = "exact",
                      device: str = "cpu", dtype=None, max_shard_size: str | int = "5GB",
                      force: bool = False, progress: bool | None = None,
                      full_hash: bool = False, extra_recipe: Mapping | None = None
                      ) -> MergeReport:
    """Merge two Hugging Face checkpoint folders by MoD weight select into a new folder.

    Args:
        base: model 1's folder (model.safetensors or shards + model.safetensors.index.json);
            its config, generation config and tokenizer are copied to the output.
        other: model 2's folder; only the pages holding selected elements are read.
        out: the output folder; must not exist (unless `force`) nor be or contain an input.
        alpha: a float in [0, 1], a mapping name pattern -> float (first match wins), or a
            function of the tensor name (None: carry that tensor over), as in
            merge_state_dicts.
        include, exclude: name patterns selecting the tensors to merge (e.g. "mlp").
        strict: raise if the models' tensor names differ; if False, BASE's extra tensors
            are carried over and OTHER's ignored.
        precision: "exact" or "reference" (the released code's arithmetic, bit for bit).
        device: "cpu", or "cuda"/"cuda:N" to run the select through the Triton kernels.
        dtype: cast floating-point output tensors to this dtype (after the merge).
        max_shard_size: largest output shard, e.g. "5GB" (decimal) or "4GiB".
        force: replace an existing `out` (the previous folder stays intact until the new
            one is complete, then is swapped out at once).
        progress: show a progress bar; None shows one only when stderr is a terminal.
        full_hash: record the sha256 of every input weight file in the recipe (reads all
            of OTHER); by default the sha256 of each file's header and its size.
        extra_recipe: extra entries for the recipe file (e.g. the config it came from).

    Returns a MergeReport. Raises a ModkernError subclass, naming the file, tensor and what
    was expected, for bad input; in that case nothing is left at `out` (or the previous
    folder is untouched).
    """
    start = time.perf_counter()
    with open_merge(base, other, out, alpha, include=include, exclude=exclude, strict=strict,
                    precision=precision, device=device, dtype=dtype,
                    max_shard_size=max_shard_size, force=force, full_hash=full_hash,
                    extra_recipe=extra_recipe) as job:
        report = job.new_report()
        make_parent(job.out)
        tmp = publish.temp_folder(job.out)
        writer = BackgroundWriter(ShardWriter(tmp, job.shards))
        bar = _progress_bar(progress, sum(s.nbytes for s in job.shards), len(job.planned))
        delay = float(os.environ.get(_SLOW_ENV, "0") or 0)
        done = 0
        try:
            for name, t1 in _prefetched(job.ck1):
                t1 = job.merge_one(name, t1, report)
                writer.write(name, t1)
                del t1
                done += 1
                if bar is not None:
                    bar.set_postfix_str(f"{done}/{len(job.planned)} tensors", refresh=False)
                    bar.update(writer.bytes_written - bar.n)
                if delay:
                    time.sleep(delay)
            writer.finish()
            report.bytes_written = writer.bytes_written
            report.bytes_read_base = job.ck1.bytes_read
            report.bytes_read_other = job.ck2.bytes_read
            report.seconds = time.perf_counter() - start
            job.finish_folder(tmp, report)
            publish.publish(tmp, job.out, replace=force)
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if bar is not None:
                bar.close()
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class MergeJob:
    """A validated, planned merge with both checkpoints open (made by `open_merge`): what
    every process of a merge needs, whether it writes the whole output or a part of it."""

    base: Path
    other: Path
    out: Path
    ck1: Checkpoint
    ck2: Checkpoint
    alpha: AlphaRule
    include: Patterns
    exclude: Patterns
    strict: bool
    precision: str
    device: torch.device
    out_dtype: torch.dtype | None
    shard_bytes: int
    full_hash: bool
    extra_recipe: Mapping | None
    plan: dict[str, float]          # merged tensors -> alpha; the others are copied
    planned: list[PlannedTensor]    # every output tensor, in BASE's file order
    shards: list                    # the output's shard plan (shard_writer.Shard)
    copied: list[str]               # BASE's files copied beside the weights

    def new_report(self) -> MergeReport:
        return MergeReport(out=self.out, bytes_base=self.ck1.weight_bytes,
                           bytes_other=self.ck2.weight_bytes)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """The output dtype (--dtype) applied to a merged or copied tensor."""
        if self.out_dtype is not None and t.is_floating_point() and t.dtype != self.out_dtype:
            return t.to(self.out_dtype)
        return t

    def merge_one(self, name: str, t1: torch.Tensor, report: MergeReport) -> torch.Tensor:
        """BASE's whole tensor `name` -> the output tensor, counted in `report`."""
        if name in self.plan:
            t1, taken = _merge_tensor(name, t1, self.ck1, self.ck2, self.plan[name],
                                      self.precision, self.device)
            report.tensors_merged += 1
            report.elements_merged += t1.numel()
            report.elements_taken += taken
            report.taken_by_key[name] = taken
        else:
            report.tensors_copied += 1
        return self.cast(t1)

    def finish_folder(self, tmp: Path, report: MergeReport) -> None:
        """Everything but the weights: config and tokenizer from BASE, the recipe, the
        model card (the index is written with the shards)."""
        inputs = {"base": recipe_io.describe_input(self.ck1, self.copied, self.full_hash),
                  "other": recipe_io.describe_input(self.ck2, self.copied, self.full_hash)}
        copy_base_files(self.base, tmp, self.copied, self.out_dtype)
        record = _recipe(inputs, self.alpha, self.include, self.exclude, self.strict,
                         self.precision, self.out_dtype, self.shard_bytes, self.full_hash,
                         report, self.ck1.names(), self.plan, self.extra_recipe)
        recipe_io.write_recipe(tmp, record)
        write_file(tmp / "README.md",
                   [recipe_io.model_card(self.base, self.other, record).encode("utf-8")])


@contextmanager
def open_merge(base: str | os.PathLike, other: str | os.PathLike, out: str | os.PathLike,
               alpha: AlphaRule, *, include: Patterns = None, exclude: Patterns = None,
               strict: bool = True, precision: str = "exact", device: str = "cpu",
               dtype=None, max_shard_size: str | int = "5GB", force: bool = False,
               full_hash: bool = False, extra_recipe: Mapping | None = None
               ) -> Iterator[MergeJob]:
    """Check everything that can be checked without tensor data (arguments, folders,
    headers, keys, shapes, dtypes, alpha rules, output path, disk space), plan the output
    shards, and yield a MergeJob with both checkpoints open. Arguments as merge_checkpoints."""
    check_precision(precision)
    if not isinstance(alpha, Mapping) and not callable(alpha):
        alpha = check_alpha_rule(alpha)  # a plain number: before anything is opened
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r}: no CUDA device is available here; use "
                           "--device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device {device!r}: expected 'cpu' or 'cuda'")
    base_p, other_p = Path(base).absolute(), Path(other).absolute()
    out_p = out_path(out)
    publish.remove_stale(out_p)  # first: it may restore the OUT a killed swap left aside
    check_out_path(base_p.resolve(), other_p.resolve(), out_p.resolve(), force)

    with Checkpoint(base_p, "BASE", "sequential") as ck1, \
            Checkpoint(other_p, "OTHER", "random") as ck2:
        check_configs(ck1.config(), ck2.config(), base_p, other_p)
        sd1 = {n: i.meta() for n, i in ck1.items()}
        sd2 = {n: i.meta() for n, i in ck2.items()}
        if strict:
            try:
                check_keys(sd1, sd2)
            except ModkernError as err:
                raise type(err)(f"BASE {base_p} vs OTHER {other_p}: {err}".replace(
                    "pass strict=False", "pass --no-strict / strict=False")) from None
        keep = name_filter(include, exclude)
        plan: dict[str, float] = {}
        for name in sd1:
            try:
                plan |= _plan({name: sd1[name]}, {name: sd2[name]} if name in sd2 else {},
                              alpha, keep)
            except ModkernError as err:
                raise type(err)(f"BASE {ck1.where[name].path} vs OTHER "
                                f"{ck2.where[name].path}: {err}") from None

        alpha = check_alpha_rule(alpha)  # also the values no tensor matched
        planned = [PlannedTensor(n, out_dtype if out_dtype is not None and
                                 i.dtype.is_floating_point else i.dtype, i.shape)
                   for n, i in ck1.items()]
        shards = plan_shards(planned, shard_bytes)
        copied = [f for f in COPIED if (base_p / f).is_file()]
        needed = sum(s.nbytes + len(s.header()) for s in shards) + \
            sum((base_p / f).stat().st_size for f in copied) + (1 << 20)
        check_space(out_p, needed)
        yield MergeJob(base_p, other_p, out_p, ck1, ck2, alpha, include, exclude, strict,
                       precision, dev, out_dtype, shard_bytes, full_hash, extra_recipe, plan,
                       planned, shards, copied)


def _prefetched(ck: Checkpoint, names: list[str] | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """BASE's tensors (all, or `names`) in file order, each read by a background thread
    while the one before is merged and written (positioned reads release the GIL).

    Tensors live in a ring of _RING byte buffers sized to the largest tensor, reused
    rather than allocated per tensor (fresh memory costs a page fault per 4 KB). A yielded
    tensor is valid until _RING - 1 more have been yielded: one is being read, one merged,
    one written (BackgroundWriter keeps at most one write in flight)."""
    names = ck.names() if names is None else names
    largest = max((ck.info(n).nbytes for n in names), default=0)
    ring = [torch.empty(largest, dtype=torch.uint8) for _ in range(min(_RING, len(names)))]

    def target(i: int) -> torch.Tensor:
        info = ck.info(names[i])
        return ring[i % len(ring)][:info.nbytes].view(info.dtype).view(info.shape)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="modkern-read") as pool:
        def read(i: int):
            if i >= len(names):
                return None
            return pool.submit(ck.where[names[i]].read_tensor, names[i], target(i))

        pending = read(0)
        for i, name in enumerate(names):
            tensor = pending.result()
            pending = read(i + 1)
            yield name, tensor
            del tensor


def _progress_bar(progress: bool | None, total_bytes: int, tensors: int):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                desc="modkern merge", file=sys.stderr, dynamic_ncols=True,
                postfix=f"0/{tensors} tensors")


def _recipe(inputs, alpha, include, exclude, strict, precision, out_dtype, shard_bytes,
            full_hash, report: MergeReport, names, plan, extra) -> dict:
    exclude = pattern_list(exclude)
    if callable(alpha) and not isinstance(alpha, Mapping):
        # a function is recorded as its values: per merged tensor an exact-name pattern,
        # and the tensors it left unmerged join `exclude`, so the recipe reruns as is
        skipped = [exact_pattern(n) for n in names if plan.get(n) is None]
        exclude = (exclude or []) + skipped if skipped else exclude
    record = {
        "modkern_version": __version__,
        "method": "mod-weight-select",
        "inputs": inputs,
        "alpha": recipe_io.alpha_record(alpha, plan),
        "include": pattern_list(include),
        "exclude": exclude,
        "precision": precision,
        "strict": strict,
        "dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch."),
        "max_shard_size": shard_bytes,
        "hashes": "sha256 of whole files" if full_hash else
                  "weight files: sha256 of the safetensors header + size; others: sha256",
        "result": {k: v for k, v in asdict(report).items()
                   if k not in ("out", "taken_by_key", "seconds")},
    }
    if extra:
        record["source"] = dict(extra)
    return record
