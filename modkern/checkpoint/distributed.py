"""`merge_checkpoints` over several processes with torch.distributed, launched by torchrun.

    torchrun --nproc-per-node 4 -m modkern merge BASE OTHER OUT --alpha 0.9

Every rank opens both checkpoints (headers only), validates and plans exactly as a single
process does, so the shard plan and the work assignment below come out identical on every
rank without being sent. Work is split by tensor, balanced by bytes (greedy, largest first);
a tensor above `split_above` bytes is split by rows over all ranks, its min and max
all-reduced so that every rank computes the same exact threshold and selects its own rows.
Rank 0 creates the temporary folder and the output shards at full size (header written,
data sparse); each rank then reads only its tensors (its rows) of BASE, the pages of OTHER
they select, and writes them in place with positioned writes. After all ranks report
success, rank 0 writes the index, config, tokenizer, recipe and card and publishes OUT
atomically. Any failure on any rank (bad weights, I/O error, a rank killed) fails the whole
merge: OUT is not written and the failing rank's message is raised on every rank.

No tensor data crosses between ranks: each writes its own bytes into the shared output
files. The only collectives are a few scalars and status flags per split tensor and one
exchange per phase, so they run on gloo over CPU tensors whatever the device (with
`--device cuda` each rank runs its selects on its GPU, LOCAL_RANK; a job that already has
an NCCL default group gets a gloo subgroup for this). The inputs and OUT's parent must be
on a filesystem every rank sees at the same path (one machine, or a shared filesystem).
The result is bit-identical to the single-process merge: the same shard files, byte for
byte.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from .. import errors
from . import publish
from .merge import (MergeJob, _prefetched, _progress_bar, checked_minmax, open_merge,
                    patch_from_other)
from .options import parse_device
from .out_folder import make_parent
from .report import MergeReport
from ..errors import CheckpointError, ModkernError
from ..ops.select_reference import select_threshold
from .shard_writer import (BackgroundWriter, PlannedTensor, PositionedWriter, preallocate,
                           write_index)

# Tensors above this many bytes are split by rows over the ranks (override: split_above).
DEFAULT_SPLIT_ABOVE = 4 * 1000 ** 3
# Seconds a rank waits in a collective for the others (a rank that dies closes its
# connections, which the others see at once; this bounds the silent cases).
DEFAULT_TIMEOUT_S = 1800.0
# Test hook: "RANK:raise", "RANK:kill" or "RANK:hang": that rank fails (or stops) after
# writing its first tensor.
_FAIL_ENV = "MODKERN_TEST_DIST_FAIL"
_REPORT_COUNTS = ("tensors_merged", "tensors_copied", "elements_merged", "elements_taken",
                  "bytes_read_base", "bytes_read_other", "bytes_written")


class DistributedMergeError(CheckpointError):
    """Raised on every rank when one rank's part of the merge failed. `rank` is the rank
    that failed; `origin` its exception class name. When that was a modkern error (e.g.
    NonFiniteError), the exception raised is also an instance of that class."""

    def __init__(self, message: str, rank: int, origin: str):
        super().__init__(message)
        self.rank, self.origin = rank, origin


_AGREED_CLASSES: dict[str, type] = {}


def _agreed_error(message: str, rank: int, origin: str) -> DistributedMergeError:
    """A DistributedMergeError that is also the failing rank's modkern error class."""
    cls = getattr(errors, origin, None)
    if not (isinstance(cls, type) and issubclass(cls, ModkernError)) or \
            issubclass(DistributedMergeError, cls):
        return DistributedMergeError(message, rank, origin)
    if origin not in _AGREED_CLASSES:
        _AGREED_CLASSES[origin] = type(origin, (DistributedMergeError, cls),
                                       {"__module__": __name__})
    return _AGREED_CLASSES[origin](message, rank, origin)


class PeerLostError(CheckpointError):
    """A collective failed on this rank: another rank died, or the timeout passed."""


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE") or 1) > 1 and bool(os.environ.get("RANK"))


@dataclass(frozen=True)
class Part:
    """One rank's work item: a whole tensor (rows None) or rows [start, stop) of one."""

    name: str
    rows: tuple[int, int] | None = None


def assign(planned: list[PlannedTensor], world: int, split_above: int
           ) -> list[list[Part]]:
    """Each rank's parts, in file order (the same answer on every rank).

    Tensors above `split_above` bytes with at least two rows are split into `world` row
    blocks, block r to rank r. The rest go whole, largest first, to the rank with the
    fewest bytes so far (ties: the lowest rank)."""
    parts: list[list[Part]] = [[] for _ in range(world)]
    load = [0] * world
    order = {t.name: i for i, t in enumerate(planned)}
    whole = []
    for t in planned:
        if world > 1 and t.nbytes > split_above and len(t.shape) >= 1 and t.shape[0] >= 2:
            rows = t.shape[0]
            for r in range(world):
                a, b = rows * r // world, rows * (r + 1) // world
                parts[r].append(Part(t.name, (a, b)))
                load[r] += _part_bytes(t, parts[r][-1])
        else:
            whole.append(t)
    for t in sorted(whole, key=lambda t: (-t.nbytes, order[t.name])):
        r = min(range(world), key=lambda k: (load[k], k))
        parts[r].append(Part(t.name))
        load[r] += t.nbytes
    for p in parts:
        p.sort(key=lambda part: order[part.name])
    return parts


class _Group:
    """The process group and the few collectives the merge needs, on CPU tensors (gloo).
    A collective that fails (a rank died, or the timeout passed) raises PeerLostError."""

    def __init__(self, timeout_s: float):
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_available():
            raise CheckpointError("torch.distributed is not available in this torch build")
        self.created = not dist.is_initialized()
        if self.created:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        self.group = None if dist.get_backend() == "gloo" else \
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, group=self.group, **kw)
        except RuntimeError as err:  # gloo: connection closed / timed out
            first = _first_sentence(str(err)) or type(err).__name__
            raise PeerLostError(f"rank {self.rank}: lost contact with the other ranks while "
                                f"{what} ({first}); another rank failed, was killed or did "
                                "not answer in time: the merge is abandoned, OUT not "
                                "written") from None

    def gather(self, obj, what: str) -> list:
        out = [None] * self.world
        self._call(what, self.dist.all_gather_object, out, obj)
        return out

    def reduce_max(self, t: torch.Tensor, what: str) -> torch.Tensor:
        self._call(what, self.dist.all_reduce, t, op=self.dist.ReduceOp.MAX)
        return t

    def close(self) -> None:
        if self.created and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _first_sentence(text: str) -> str:
    """'[.../pair.cc:553] Connection closed by peer [addr]. This is ...' -> 'Connection
    closed by peer [addr]' (gloo's messages are long)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line.split(". ")[0].rstrip(".")


def _describe(err: BaseException) -> tuple[str, str]:
    if isinstance(err, DistributedMergeError):
        return err.origin, str(err)
    if isinstance(err, KeyboardInterrupt):
        return "KeyboardInterrupt", "interrupted"
    if isinstance(err, ModkernError):
        return type(err).__name__, str(err)
    return type(err).__name__, f"{type(err).__name__}: {err}"


def _agree(group: _Group, err: BaseException | None, what: str, extra=None) -> list:
    """Every rank says whether its step succeeded; if any failed, every rank raises the
    first failing rank's error. Returns every rank's `extra` otherwise."""
    mine = None if err is None else _describe(err)
    if err is not None and not isinstance(err, (ModkernError, KeyboardInterrupt,
                                                _OtherRankFailed)):
        traceback.print_exception(err)  # not bad input: a bug or an OS error, keep its trace
    said = group.gather((mine, extra), what)
    failed = [(rank, f) for rank, (f, _) in enumerate(said) if f is not None]
    # A rank that only learnt of another's failure (a split tensor's all_reduce) defers.
    failed.sort(key=lambda rf: (rf[1][0] == _OtherRankFailed.__name__, rf[0]))
    for rank, (origin, message) in failed[:1]:
        if origin == "KeyboardInterrupt":
            message = f"rank {rank} was interrupted"
        elif not message.startswith("rank "):
            message = f"rank {rank}: {message}"
        raise _agreed_error(message, rank, origin)
    return [e for _, e in said]


def merge_checkpoints_distributed(base, other, out, alpha, *, split_above: int | None = None,
                                  timeout_s: float = DEFAULT_TIMEOUT_S,
                                  progress: bool | None = None, **options) -> MergeReport:
    """merge_checkpoints run by every rank of a torch.distributed job (torchrun); the same
    arguments (passed through as `options`), plus:

        split_above: split tensors above this many bytes by rows over the ranks
            (default DEFAULT_SPLIT_ABOVE).
        timeout_s: how long a rank waits for the others at a collective.

    Initializes the default process group from torchrun's environment unless one exists
    (and then destroys it). `device="cuda"` means this rank's GPU (LOCAL_RANK). Every rank
    returns the same totals (MergeReport); on failure every rank raises
    DistributedMergeError with the failing rank's message and OUT is not written.
    """
    start = time.perf_counter()
    device = options.pop("device", "cpu")
    if parse_device(device).type == "cuda" and parse_device(device).index is None \
            and torch.cuda.is_available():
        # this rank's GPU (ranks share GPUs round-robin when there are more ranks)
        local = int(os.environ.get("LOCAL_RANK") or 0)
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    split_above = DEFAULT_SPLIT_ABOVE if split_above is None else int(split_above)
    group = _Group(timeout_s)
    try:
        return _run(group, base, other, out, alpha, device, split_above, progress, start,
                    options)
    finally:
        group.close()


def _run(group: _Group, base, other, out, alpha, device, split_above, progress, start,
         options) -> MergeReport:
    rank = group.rank
    err: BaseException | None = None
    with ExitStack() as stack:
        try:
            job = stack.enter_context(open_merge(base, other, out, alpha, device=device,
                                                 **options))
        except BaseException as e:  # noqa: BLE001 - reported to every rank just below
            err = e
        _agree(group, err, "checking the inputs")

        tmp: Path | None = None
        try:
            if rank == 0:
                make_parent(job.out)
                tmp = publish.temp_folder(job.out)
                preallocate(tmp, job.shards)
        except BaseException as e:  # noqa: BLE001
            err = e
        try:
            tmp = Path(_agree(group, err, "creating the output", str(tmp) if tmp else None)[0])
            report = _merge_parts(group, job, tmp, split_above, progress)
            report.bytes_base, report.bytes_other = job.ck1.weight_bytes, job.ck2.weight_bytes
            report.seconds = time.perf_counter() - start
            if rank == 0:
                try:
                    write_index(tmp, job.shards)
                    job.finish_folder(tmp, report)
                    publish.publish(tmp, job.out, replace=options.get("force", False))
                except BaseException as e:  # noqa: BLE001
                    err = e
            _agree(group, err, "publishing OUT")
        except BaseException:
            if rank == 0 and tmp is not None and tmp.exists() and tmp != job.out:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    report.seconds = time.perf_counter() - start
    return report


def _merge_parts(group: _Group, job: MergeJob, tmp: Path, split_above: int,
                 progress: bool | None) -> MergeReport:
    """This rank's share: the split tensors' row blocks (with one all_reduce each, in the
    same order on every rank), then its whole tensors. Fails on every rank if any rank's
    share failed."""
    rank, world = group.rank, group.world
    mine = assign(job.planned, world, split_above)[rank]
    split = [p for p in mine if p.rows is not None]
    whole = [p.name for p in mine if p.rows is None]
    report = job.new_report()
    planned = {t.name: t for t in job.planned}
    writer = BackgroundWriter(PositionedWriter(tmp, job.shards))
    total = sum(_part_bytes(planned[p.name], p) for p in mine)
    bar = _progress_bar(progress, total, len(mine)) if rank == 0 else None
    if bar is not None:
        bar.set_description(f"modkern merge (rank 0 of {world})")
    fail = os.environ.get(_FAIL_ENV, "")
    err: BaseException | None = None
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if bar is not None:
            bar.set_postfix_str(f"{done}/{len(mine)} tensors", refresh=False)
            bar.update(writer.bytes_written - bar.n)
        if fail and fail.split(":")[0] == str(rank) and done == 1:
            _fail_for_test(fail.split(":")[1])

    try:
        for part in split:  # every rank has a block of every split tensor, in one order
            err = _merge_rows(group, job, part, writer, report, err)
            if err is None:
                try:
                    tick()
                except BaseException as e:  # noqa: BLE001 - reported to every rank
                    err = e
        if err is None:
            try:
                for name, t1 in _prefetched(job.ck1, whole):
                    writer.write(name, job.merge_one(name, t1, report))
                    del t1
                    tick()
                writer.finish()
            except BaseException as e:  # noqa: BLE001 - reported to every rank
                err = e
        if err is not None:
            writer.abort()
        report.bytes_written = writer.bytes_written
        report.bytes_read_base, report.bytes_read_other = job.ck1.bytes_read, job.ck2.bytes_read
        _sum_reports(report, _agree(group, err, "merging", _counts(report)), job.ck1.names())
    finally:
        if bar is not None:
            bar.close()
    return report


def _part_bytes(t: PlannedTensor, part: Part) -> int:
    if part.rows is None:
        return t.nbytes
    return t.nbytes // t.shape[0] * (part.rows[1] - part.rows[0])


def _merge_rows(group: _Group, job: MergeJob, part: Part, writer: BackgroundWriter,
                report: MergeReport, err: BaseException | None) -> BaseException | None:
    """Rows part.rows of one split tensor. Every rank takes part in the one all_reduce, even
    after its own failure (then it only reports it), so that no rank waits forever; returns
    this rank's error, or the news that another rank failed."""
    name, (a, b) = part.name, part.rows
    info = job.ck1.info(name)
    merged = name in job.plan
    block = None
    # [-min, max, failed] of this block: one MAX all_reduce gives the tensor's min and max
    # and whether any rank failed (float64 holds every value of the narrower dtypes exactly).
    local = torch.tensor([-float("inf"), -float("inf"), 0.0], dtype=torch.float64)
    if err is None:
        try:
            row_elems = info.numel // info.shape[0]
            block = torch.empty((b - a, *info.shape[1:]), dtype=info.dtype)
            if block.numel():
                job.ck1.where[name].read_into(block, info.offset + a * row_elems *
                                              info.itemsize)
            if merged and block.numel():
                flat = block.view(-1).to(job.device)  # kept for the select below
                mn, mx = checked_minmax(flat, job.ck1.where[name].path, name, a * row_elems)
                local[0], local[1] = -mn.double().cpu(), mx.double().cpu()
        except BaseException as e:  # noqa: BLE001 - reported after the all_reduce
            err = e
    local[2] = float(err is not None)
    if merged:
        group.reduce_max(local, f"reducing the min and max of {name!r}")
        if err is None and local[2] > 0:
            return _OtherRankFailed()
    if err is not None:
        return err
    try:
        if merged:
            report.tensors_merged += a == 0 < b  # counted by one rank
            report.elements_merged += block.numel()
            report.taken_by_key[name] = 0
            if block.numel():
                mn = (-local[0]).to(info.dtype)
                mx = local[1].to(info.dtype)
                v = select_threshold(mn, mx, job.plan[name], job.precision).to(job.device)
                reader = job.ck2.where[name]
                first = a * row_elems
                taken = patch_from_other(
                    flat, v, lambda idx: reader.read_elements(name, idx + first),
                    (job.ck1.where[name].path, reader.path), name, first)
                block = flat.cpu().view(block.shape)
                report.elements_taken += taken
                report.taken_by_key[name] = taken
        else:
            report.tensors_copied += a == 0 < b
        writer.write(name, job.cast(block), a)
    except BaseException as e:  # noqa: BLE001
        return e
    return None


class _OtherRankFailed(Exception):
    """This rank is fine but another failed; the agreement that follows names which."""


def _fail_for_test(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":  # a rank stuck (e.g. on a dead disk): the others must time out
        time.sleep(3600)
    raise CheckpointError(f"test failure injected by {_FAIL_ENV}")


def _counts(report: MergeReport) -> dict:
    return {k: getattr(report, k) for k in _REPORT_COUNTS} | {"taken": report.taken_by_key}


def _sum_reports(report: MergeReport, totals: list[dict], names: list[str]) -> None:
    """All ranks' counters into `report` (taken_by_key in BASE's order of names)."""
    for k in _REPORT_COUNTS:
        setattr(report, k, sum(t[k] for t in totals))
    taken: dict[str, int] = {}
    for t in totals:
        for name, n in t["taken"].items():
            taken[name] = taken.get(name, 0) + n
    report.taken_by_key = {n: taken[n] for n in names if n in taken}
