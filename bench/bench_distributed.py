"""Scaling of the distributed checkpoint merge on CPU: `modkern merge` in one process against
`torchrun --nproc-per-node N -m modkern merge` (gloo) on the generated checkpoint pair of
bench_checkpoint.py, each from a cold page cache, outputs checked byte-identical.

Reported per run: wall time of the whole command (process start, torch import and, for
torchrun, the rendezvous included) and the merge's own time (rank 0's summary line).

    pytest bench/bench_distributed.py --benchmark-only -s        # or
    python bench/bench_distributed.py                             # prints a table

MODKERN_BENCH_SMALL=1: tiny checkpoints. MODKERN_BENCH_NPROC: the process counts to run
(default "1,2"). MODKERN_BENCH_SPLIT_ABOVE: also run the largest count with tensors above
this many bytes split by rows (default 50000000; empty to skip).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import ALPHA, SMALL, generate, weight_files  # noqa: E402

from modkern.checkpoint import page_cache  # noqa: E402

from _common import scratch_fixture, main, run_once  # noqa: E402

NPROC = [int(n) for n in os.environ.get("MODKERN_BENCH_NPROC", "1,2").split(",")]
SPLIT_ABOVE = os.environ.get("MODKERN_BENCH_SPLIT_ABOVE", "1000" if SMALL else "50000000")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merge_command(nproc: int, base: Path, other: Path, out: Path,
                  split_above: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "modkern", "merge"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "modkern",
               "merge"]
    cmd += [str(base), str(other), str(out), "--alpha", str(ALPHA)]
    return cmd + (["--split-above", split_above] if split_above else [])


def timed_merge(nproc: int, base: Path, other: Path, out: Path,
                split_above: str | None = None) -> dict:
    """One merge from a cold page cache: wall time and the merge's own seconds."""
    page_cache.evict_files(weight_files(base) + weight_files(other))
    env = dict(os.environ, OMP_NUM_THREADS="1") if nproc > 1 else dict(os.environ)
    start = time.perf_counter()
    proc = subprocess.run(merge_command(nproc, base, other, out, split_above), env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"in (\d+\.\d+) s$", proc.stdout.strip())
    return {"nproc": nproc, "split_above": split_above, "wall_s": wall,
            "merge_s": float(m.group(1)) if m else None}


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.endswith((".safetensors", ".json")) and p.name != "config.json"}


def run_benchmark(root: Path) -> dict:
    base, other = root / "base", root / "other"
    generate(base, 0)
    generate(other, 1)
    runs = []
    reference = None
    plans = [(n, None) for n in NPROC]
    if SPLIT_ABOVE and max(NPROC) > 1:
        plans.append((max(NPROC), SPLIT_ABOVE))
    for nproc, split in plans:
        out = root / f"out-{nproc}-{split}"
        runs.append(timed_merge(nproc, base, other, out, split))
        weights = _weights(out)
        if reference is None:
            reference = weights
        assert weights == reference, f"{nproc} processes: output differs from the first run"
        shutil.rmtree(out)
    size = sum(f.stat().st_size for f in weight_files(base))
    return {"bytes_per_model": size, "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0], "runs": runs}


def format_table(r: dict) -> str:
    one = next((x for x in r["runs"] if x["nproc"] == 1), None)
    lines = [f"inputs: 2 x {r['bytes_per_model'] / 1e9:.2f} GB bf16, alpha {ALPHA}; "
             f"{r['cpus']} CPUs, load average {r['load_average']:.1f}; cold page cache",
             "", "| processes | split above | wall time | merge time | speed-up (merge) |",
             "|---|---|---|---|---|"]
    for x in r["runs"]:
        speed = f"{one['merge_s'] / x['merge_s']:.2f}x" if one and x["merge_s"] else "-"
        lines.append(f"| {x['nproc']} | {x['split_above'] or '-'} | {x['wall_s']:.1f} s | "
                     f"{x['merge_s']:.1f} s | {speed} |")
    return "\n".join(lines)


bench_dir = scratch_fixture("dist")


def bench_distributed_merge(benchmark, bench_dir):
    run_once(benchmark, "checkpoint merge: 1 process vs torchrun (gloo, CPU)", run_benchmark,
             bench_dir, format_table)


if __name__ == "__main__":
    main("dist", run_benchmark, format_table)
