"""What every benchmark suite shares: the CI switch, the device, and a scratch folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# MODKERN_BENCH_SMALL=1: tiny shapes, no torch.compile (CI runs every suite once with
# timings off to keep them working).
SMALL = os.environ.get("MODKERN_BENCH_SMALL", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Wait for the GPU (timings must include the kernels, not just their launch)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


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
