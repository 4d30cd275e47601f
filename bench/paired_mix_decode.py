"""Paired timing of mix_logits against the eager formula on a few decoding rows, for a
machine shared with other jobs: the two alternate call by call, so a burst of load hits
both; prints each one's minimum and median (ms) and the median per-pair ratio.

    python bench/paired_mix_decode.py [pairs] [rows ...]      # default: 200 pairs, 1 4 8
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import modkern
from bench_mix_logits import ALPHA, eager_formula

V = 151_936


def paired(rows: int, dtype: torch.dtype, pairs: int) -> dict:
    g = torch.Generator().manual_seed(0)
    l1 = (torch.randn(rows, V, generator=g) * 3).to(dtype)
    l2 = (torch.randn(rows, V, generator=g) * 3).to(dtype)
    fns = {"eager": lambda: eager_formula(l1, l2, ALPHA),
           "modkern": lambda: modkern.mix_logits(l1, l2, ALPHA)}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(5 + pairs):
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            start = time.perf_counter()
            fns[name]()
            if i >= 5:
                times[name].append((time.perf_counter() - start) * 1e3)
    ratio = statistics.median(m / e for m, e in zip(times["modkern"], times["eager"]))
    return {"min": {k: min(v) for k, v in times.items()},
            "median": {k: statistics.median(v) for k, v in times.items()}, "ratio": ratio}


if __name__ == "__main__":
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    for dtype in (torch.bfloat16, torch.float32):
        for rows in [int(r) for r in sys.argv[2:]] or [1, 4, 8]:
            print(dtype, rows, paired(rows, dtype, pairs), flush=True)
