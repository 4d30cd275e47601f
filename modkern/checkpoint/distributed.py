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
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from . import publish
from .job import MergeJob, open_merge
from .options import MergeOptions
from .out_folder import make_parent
from .ranks import (DistributedMergeError, Group, OtherRankFailed, PeerLostError, agree,
                    agreed_error)
from .report import MergeReport, Progress
from .shard_writer import (BackgroundWriter, PlannedTensor, PositionedWriter, preallocate,
                           write_index)
from ..ops.select_pipeline import FlatSelect

__all__ = ["merge_checkpoints_distributed", "launched_by_torchrun", "assign", "Part",
           "DistributedMergeError", "PeerLostError", "agreed_error", "DEFAULT_SPLIT_ABOVE",
           "DEFAULT_TIMEOUT_S"]

# Tensors above this many bytes are split by rows over the ranks (override: split_above).
DEFAULT_SPLIT_ABOVE = 4 * 1000 ** 3
# Seconds a rank waits in a collective for the others (a rank that dies closes its
# connections, which the others see at once; this bounds the silent cases).
DEFAULT_TIMEOUT_S = 1800.0


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


def merge_checkpoints_distributed(base, other, out, alpha, *, split_above: int | None = None,
                                  timeout_s: float = DEFAULT_TIMEOUT_S,
                                  **options) -> MergeReport:
    """merge_checkpoints run by every rank of a torch.distributed job (torchrun); the same
    arguments (the keywords are MergeOptions'), plus:

        split_above: split tensors above this many bytes by rows over the ranks
            (default DEFAULT_SPLIT_ABOVE).
        timeout_s: how long a rank waits for the others at a collective.

    Initializes the default process group from torchrun's environment unless one exists
    (and then destroys it). `device="cuda"` means this rank's GPU (LOCAL_RANK). Every rank
    returns the same totals (MergeReport); on failure every rank raises
    DistributedMergeError with the failing rank's message and OUT is not written.
    """
    start = time.perf_counter()
    options["device"] = _rank_device(options.get("device", "cpu"))
    split_above = DEFAULT_SPLIT_ABOVE if split_above is None else int(split_above)
    group = Group(timeout_s)
    try:
        return _run(group, (base, other, out), alpha, options, split_above, start)
    finally:
        group.close()


def _rank_device(device):
    """This rank's GPU for a plain "cuda" (ranks share GPUs round-robin when there are
    more ranks than GPUs); any other device as given."""
    if str(device) == "cuda" and torch.cuda.is_available():  # (a bad one: MergeOptions says)
        local = int(os.environ.get("LOCAL_RANK") or 0)
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    return device


def _run(group: Group, paths: tuple, alpha, options: dict, split_above: int,
         start: float) -> MergeReport:
    rank = group.rank
    err: BaseException | None = None
    with ExitStack() as stack:
        try:  # the options are checked here, so that every rank reports the same error
            job = stack.enter_context(open_merge(*paths, MergeOptions(alpha, **options)))
        except BaseException as e:  # noqa: BLE001 - reported to every rank just below
            err = e
        agree(group, err, "checking the inputs")

        tmp: Path | None = None
        try:
            if rank == 0:
                make_parent(job.out)
                tmp = publish.temp_folder(job.out)
                preallocate(tmp, job.shards)
        except BaseException as e:  # noqa: BLE001
            err = e
        try:
            tmp = Path(agree(group, err, "creating the output", str(tmp) if tmp else None)[0])
            report = _merge_parts(group, job, tmp, split_above)
            report.bytes_base, report.bytes_other = job.ck1.weight_bytes, job.ck2.weight_bytes
            report.seconds = time.perf_counter() - start
            if rank == 0:
                try:
                    write_index(tmp, job.shards)
                    job.finish_folder(tmp, report)
                    publish.publish(tmp, job.out, replace=job.options.force)
                except BaseException as e:  # noqa: BLE001
                    err = e
            agree(group, err, "publishing OUT")
        except BaseException:
            if rank == 0 and tmp is not None and tmp.exists() and tmp != job.out:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    report.seconds = time.perf_counter() - start
    return report


def _merge_parts(group: Group, job: MergeJob, tmp: Path, split_above: int) -> MergeReport:
    """This rank's share: the split tensors' row blocks (with one all_reduce each, in the
    same order on every rank), then its whole tensors. Fails on every rank if any rank's
    share failed; returns the counts of all ranks together."""
    rank, world = group.rank, group.world
    mine = assign(job.planned, world, split_above)[rank]
    report = job.new_report()
    planned = {t.name: t for t in job.planned}
    writer = BackgroundWriter(PositionedWriter(tmp, job.shards))
    progress = Progress(job.options.progress if rank == 0 else False,
                        sum(_part_bytes(planned[p.name], p) for p in mine), len(mine),
                        job.options.hooks, rank, desc=f"modkern merge (rank 0 of {world})")
    err: BaseException | None = None
    try:
        for part in (p for p in mine if p.rows is not None):  # every rank: one order
            err = _merge_rows(group, job, part, writer, report, err)
            if err is None:
                try:
                    progress.tick(writer.bytes_written)
                except BaseException as e:  # noqa: BLE001 - reported to every rank
                    err = e
        if err is None:
            try:
                whole = [p.name for p in mine if p.rows is None]
                for name, t1 in job.base_tensors(whole):
                    writer.write(name, job.merge_one(name, t1, report))
                    del t1
                    progress.tick(writer.bytes_written)
                writer.finish()
            except BaseException as e:  # noqa: BLE001 - reported to every rank
                err = e
        if err is not None:
            writer.abort()
        report.bytes_written = writer.bytes_written
        report.bytes_read_base, report.bytes_read_other = job.ck1.bytes_read, job.ck2.bytes_read
        report.combine(agree(group, err, "merging", report), job.ck1.names())
    finally:
        progress.close()
    return report


def _part_bytes(t: PlannedTensor, part: Part) -> int:
    if part.rows is None:
        return t.nbytes
    return t.nbytes // t.shape[0] * (part.rows[1] - part.rows[0])


def _merge_rows(group: Group, job: MergeJob, part: Part, writer: BackgroundWriter,
                report: MergeReport, err: BaseException | None) -> BaseException | None:
    """Rows part.rows of one split tensor. Every rank takes part in the one all_reduce, even
    after its own failure (then it only reports it), so that no rank waits forever; returns
    this rank's error, or the news that another rank failed."""
    name, (a, b) = part.name, part.rows
    info = job.ck1.info(name)
    first = a * (info.numel // info.shape[0])  # flat index of the block's first element
    merged = name in job.plan
    block = select = on_device = None
    # [-min, max, failed] of this block: one MAX all_reduce gives the tensor's min and max
    # and whether any rank failed (float64 holds every value of the narrower dtypes exactly).
    local = torch.tensor([-float("inf"), -float("inf"), 0.0], dtype=torch.float64)
    if err is None:
        try:
            block = torch.empty((b - a, *info.shape[1:]), dtype=info.dtype)
            if block.numel():
                job.ck1.where[name].read_into(block, info.offset + first * info.itemsize)
            if merged:  # the block's elements that are merged (vocab="common": the
                # common rows), the rest kept as read
                on_device = job.on_device(block)
                part = on_device[:max(0, min(job.merged_numel(name) - first, block.numel()))]
                select = FlatSelect(part, job.engine, job.context(name, first))
                mn, mx = select.bounds()
                local[0], local[1] = -mn.double().cpu(), mx.double().cpu()
        except BaseException as e:  # noqa: BLE001 - reported after the all_reduce
            err = e
    local[2] = float(err is not None)
    if merged:
        group.reduce_max(local, f"reducing the min and max of {name!r}")
        if err is None and local[2] > 0:
            return OtherRankFailed()
    if err is not None:
        return err
    try:
        if merged:
            mn, mx = (-local[0]).to(info.dtype), local[1].to(info.dtype)
            result = select.apply(mn, mx, job.plan[name], job.options.precision,
                                  job.source(name, first))
            job.staging.to_host(on_device, block)
            report.add(name, result, whole=a == 0 < b)  # a tensor is counted by one rank
        else:
            report.carry(a == 0 < b)
        writer.write(name, job.cast(block), a)
    except BaseException as e:  # noqa: BLE001
        return e
    return None
