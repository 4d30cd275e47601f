"""What every benchmark suite shares: the CI switch, the device, and a scratch folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
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


def scratch_folder(name: str) -> Iterator[Path]:
    """A fresh folder for generated checkpoints (MODKERN_BENCH_DIR picks where), removed
    afterwards; the body of the suites' `bench_dir` fixtures."""
    root = Path(tempfile.mkdtemp(prefix=f"modkern-bench-{name}-",
                                 dir=os.environ.get("MODKERN_BENCH_DIR")))
    yield root
    shutil.rmtree(root, ignore_errors=True)
