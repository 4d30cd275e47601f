"""What every benchmark suite shares: the CI switch, the device, a scratch folder, and
running a command as a user runs it (a fresh process, inputs evicted or not)."""

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
