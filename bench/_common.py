"""What every benchmark suite shares: the CI switch, the device, a scratch folder, running
a command as a user runs it (a fresh process, inputs evicted or not), and the GPU suites'
timing (CUDA events), copy yardstick and result rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from modkern.checkpoint import page_cache

# MODKERN_BENCH_SMALL=1: tiny shapes, no torch.compile (CI runs every suite once with
# timings off to keep them working).
SMALL = os.environ.get("MODKERN_BENCH_SMALL", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Wait for the GPU (timings must include the kernels, not just their launch)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def console_script(name: str) -> str:
    """The path of an installed command (beside this Python), or its bare name."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


# Runs argv[2:] and writes its peak RSS and disk reads to argv[1]. A child's ru_maxrss
# counts the memory of the process that forked it (its pages, shared after fork, are
# resident in the child until exec), so a command is started from this small process
# rather than from the benchmark's (torch is loaded there): its figure is then the
# command's own, plus at most this launcher's ~10 MB.
_LAUNCHER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss * 1024} {usage.ru_inblock * 512}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_command(cmd: list[str], evict: list[Path] = ()) -> dict:
    """Run `cmd` in a child, first evicting the files `evict` from the page cache (so that
    they are read from disk); its wall time, bytes read from disk (getrusage ru_inblock:
    reads served by the page cache do not count) and peak RSS."""
    page_cache.evict_files(list(evict))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        usage_file, log = Path(tmp) / "usage", Path(tmp) / "log"
        with open(log, "w") as out:
            start = time.perf_counter()
            code = subprocess.call([sys.executable, "-c", _LAUNCHER, str(usage_file), *cmd],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n"
                               f"{log.read_text()[-3000:]}")
        peak_rss, read_bytes = map(int, usage_file.read_text().split())
    return {"wall_s": wall, "read_bytes": read_bytes, "peak_rss_bytes": peak_rss}


@contextmanager
def scratch_folder(name: str) -> Iterator[Path]:
    """A fresh folder for generated checkpoints (MODKERN_BENCH_DIR picks where), removed
    afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"modkern-bench-{name}-",
                                 dir=os.environ.get("MODKERN_BENCH_DIR")))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def scratch_fixture(name: str):
    """The pytest fixture `bench_dir` of an end-to-end suite: a fresh scratch folder
    (scratch_folder(name)) for each benchmark, removed afterwards."""
    @pytest.fixture
    def bench_dir():
        with scratch_folder(name) as root:
            yield root
    return bench_dir


def run_once(benchmark, group: str, run: Callable[[Path], dict], root: Path,
             table: Callable[[dict], str], **info) -> dict:
    """An end-to-end suite's one timed run under pytest-benchmark: its result dict goes to
    extra_info and its table to the output."""
    benchmark.group = group
    result = benchmark.pedantic(run, args=(root,), rounds=1, iterations=1)
    benchmark.extra_info.update({**info, **result})
    print("\n" + table(result))
    return result


def main(name: str, run: Callable[[Path], dict], table: Callable[[dict], str]) -> None:
    """`python bench/bench_X.py`: one run in a scratch folder, its table and its JSON."""
    with scratch_folder(name) as root:
        result = run(root)
    print(table(result))
    print(json.dumps(result))


# ---------------------------------------------------------------- the GPU suites
# bench_gpu_*.py run on a CUDA GPU (bench/gpu_check.py drives them); without one they skip,
# except under MODKERN_GPU_DRY_RUN=1 (`gpu_check.py --dry-run`): tiny shapes on the CPU,
# Triton interpreted, so CI keeps them working.
DRY_RUN = os.environ.get("MODKERN_GPU_DRY_RUN", "0") not in ("", "0")
GPU_SUITE = DEVICE == "cuda" or DRY_RUN
GPU_SKIP_REASON = "needs a CUDA GPU (or bench/gpu_check.py --dry-run)"
# modkern's own rows run the Triton kernels: on the GPU ("auto" picks them), interpreted in
# the dry run.
KERNELS = "triton" if DRY_RUN else "auto"
COPY_CAP_BYTES = 8 << 30  # the yardstick copy moves at most this much


def device_name() -> str:
    """The GPU's name, or the CPU and its thread count."""
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"


def seconds_left() -> float:
    """Seconds until the deadline gpu_check.py gives a stage (MODKERN_GPU_DEADLINE, a Unix
    time); infinite without one."""
    deadline = os.environ.get("MODKERN_GPU_DEADLINE")
    return float(deadline) - time.time() if deadline else float("inf")


def _one_sample(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of `inner` back-to-back calls: CUDA events on a GPU (the device's own
    timeline, host round trips inside fn included), the host clock after a sync on the CPU."""
    if DEVICE == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def device_seconds(fn: Callable[[], object], *, budget_s: float = 0.5, inner: int = 1,
                   setup: Callable[[], object] | None = None, max_reps: int = 200) -> float:
    """Median seconds per call of fn, do_bench style: one warm-up call (compiles, caches),
    then samples until about `budget_s` is spent (at least 3; 1 in the dry run, where only
    the plumbing is checked). `setup` runs before each sample, outside the timed region
    (e.g. restoring an input an in-place op changed)."""
    samples: list[float] = []
    least = 1 if DRY_RUN else 3
    while len(samples) < least + 1 or (len(samples) <= max_reps and
                                       sum(samples[1:]) * inner < budget_s):
        if setup:
            setup()
        sync()
        samples.append(_one_sample(fn, inner))
    timed = sorted(samples[1:])  # the first call was the warm-up
    return timed[len(timed) // 2]


def emit_row(group: str, case: str, impl: str, **fields) -> dict:
    """One result row; appended at once to the JSON-lines file MODKERN_BENCH_ROWS names (if
    any), so a stage killed at its time limit still leaves the rows it finished."""
    row = {"group": group, "case": case, "impl": impl, "device": device_name(), **fields}
    path = os.environ.get("MODKERN_BENCH_ROWS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return row


def measure(benchmark, fn: Callable[[], object], *, case: str, impl: str, floor_bytes: int,
            budget_s: float = 0.5, inner: int = 1, setup: Callable[[], object] | None = None,
            **info) -> float:
    """Time fn (device_seconds) as one pytest-benchmark round, and record the row: median
    seconds per call and GB/s on the byte floor, in extra_info and emit_row. pytest-benchmark's
    own stats then hold the wall time of the whole timing loop; the figure is extra_info's."""
    if DRY_RUN:
        budget_s = min(budget_s, 0.05)
    seconds = benchmark.pedantic(device_seconds, args=(fn,), rounds=1, iterations=1,
                                 kwargs={"budget_s": budget_s, "inner": inner, "setup": setup})
    row = emit_row(benchmark.group, case, impl, seconds=seconds, bytes_floor=floor_bytes,
                   gb_per_s=floor_bytes / seconds / 1e9, **info)
    benchmark.extra_info.update(row)
    return seconds


def skip_row(benchmark, case: str, impl: str, reason: str) -> None:
    """Record that a row was not measured, and why, then skip it."""
    import pytest

    emit_row(benchmark.group, case, impl, skipped=reason)
    pytest.skip(reason)


def need_seconds(benchmark, case: str, impl: str, seconds: float) -> None:
    """Skip the row (recorded, with the reason) when the stage's deadline is nearer than
    `seconds`: a stage that runs out of budget ends cleanly instead of being killed."""
    if seconds_left() < seconds:
        skip_row(benchmark, case, impl, f"skipped: needs ~{seconds:.0f} s, the stage's time "
                 "budget is spent")


def measure_copy(benchmark, *, case: str, floor_bytes: int, **info) -> float:
    """The yardstick row: a device-to-device copy moving `floor_bytes` (half read, half
    written), or COPY_CAP_BYTES when that is more (bandwidth is flat far past the L2
    cache). Compare rows by GB/s: a row's share of copy bandwidth on its floor bytes."""
    moved = max(2, min(floor_bytes, COPY_CAP_BYTES)) // 2 * 2
    src = torch.empty(moved // 2, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    return measure(benchmark, lambda: dst.copy_(src), case=case, impl="copy",
                   floor_bytes=moved, budget_s=0.3, **info)


_COMPILED: dict = {}


def compiled(fn: Callable, warm_up: Callable[[Callable], object]) -> Callable | str:
    """torch.compile(fn) with static shapes, warmed up (compiled) on this row's inputs by
    `warm_up(compiled_fn)`; or the reason it cannot be used: the small CI run leaves it
    out (MODKERN_BENCH_COMPILE=1 keeps it), or it failed to compile here (remembered, so
    later rows give up at once)."""
    if SMALL and not os.environ.get("MODKERN_BENCH_COMPILE"):
        return "torch.compile is left out of the small run (MODKERN_BENCH_COMPILE=1 keeps it)"
    key = fn.__qualname__
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    if not isinstance(_COMPILED[key], str):
        try:
            warm_up(_COMPILED[key])
            sync()
        except Exception as e:  # no compiler toolchain, an unsupported op, ...
            first = (str(e).splitlines() or [""])[0][:200]
            _COMPILED[key] = f"torch.compile failed: {type(e).__name__}: {first}"
    return _COMPILED[key]
