"""Cases for the vocab-parallel mix_logits tests, and the worker every rank runs.

A case builds the whole-vocabulary inputs deterministically (every process builds the same
ones) and says how the vocabulary is cut between ranks. Each rank runs the case on its
slices with group= and saves its output slice and gradients; the test process puts the
slices back together and compares them with the single-process result and the float64
reference (tests/test_mix_logits_parallel.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # a rank run outside pytest: Triton interpreted, as in CI
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from mix_cases import hard_pair, logits  # noqa: E402

# Odd slice widths, including a one-column slice; sums: 130 and 132 columns.
WIDTHS = {1: [131], 2: [61, 69], 4: [3, 51, 1, 77]}
ROWS = 5


def _cut(widths: list[int], V: int) -> list[int]:
    """The same column boundaries for a model whose vocabulary has only V columns: each
    rank keeps the part of its range below V (possibly nothing)."""
    out, start = [], 0
    for w in widths:
        out.append(max(0, min(start + w, V) - start))
        start += w
    return out


def make_case(name: str, world: int) -> dict:
    """Inputs of one case over the whole vocabulary: logits (list), weights (a float, a
    [rows] alpha tensor, or a [..., K] weights tensor), per-model slice widths, keyword
    arguments, the upstream gradient g (None: forward only)."""
    widths = WIDTHS[world]
    V = sum(widths)
    case = {"kwargs": {}, "widths": [widths, widths]}
    if name == "hard_fp32":  # masked columns, 1000-logit gaps, total disagreement
        l1, l2 = hard_pair(rows=ROWS, V=V, dtype=torch.float32)
        case.update(logits=[l1, l2], weights=torch.tensor([0.3, 1e-6, 0.5, 0.9, 1.0]))
    elif name == "bf16_n_valid":  # padded head: some ranks hold only padding
        l1, l2 = hard_pair(rows=ROWS, V=V, dtype=torch.bfloat16, seed=3)
        case.update(logits=[l1, l2], weights=0.4, kwargs={"n_valid": 40 if world == 4 else 100})
    elif name == "many_3d":  # K = 3 mixed dtypes, leading dims [2, 3], weights [2, 3, 3]
        ls = [logits((2, 3, V), dt, seed=10 + i)
              for i, dt in enumerate((torch.float16, torch.bfloat16, torch.float32))]
        ls[1][0, 1, 5:] -= 300.0
        w = torch.softmax(logits((2, 3, 3), seed=20), -1)
        w[1, 2] = torch.tensor([0.0, 0.25, 0.75])
        case.update(logits=ls, weights=w, widths=[widths] * 3)
    elif name == "common":  # model 2 has fewer columns; some ranks hold none of them
        V2 = 50 if world == 4 else 90
        l1 = logits((ROWS, V), seed=30)
        l2 = logits((ROWS, V2), seed=31)
        case.update(logits=[l1, l2], weights=torch.full((ROWS,), 0.7),
                    widths=[widths, _cut(widths, V2)], kwargs={"vocab": "common"})
    elif name == "alpha_one":  # one model left: a vocab-parallel log_softmax
        l1, l2 = hard_pair(rows=ROWS, V=V, dtype=torch.float32, seed=5)
        l2[0] = float("nan")  # dropped: must not leak
        case.update(logits=[l1, l2], weights=1.0)
    elif name == "nan_row":  # NaN on one rank makes the row NaN on every rank
        l1, l2 = logits((ROWS, V), seed=40), logits((ROWS, V), seed=41)
        l1[2, V - 1] = float("nan")
        l2[3, 0] = float("inf")
        case.update(logits=[l1, l2], weights=0.5)
        case["g"] = None
        return case
    else:
        raise KeyError(name)
    lead = case["logits"][0].shape[:-1]
    case["g"] = logits((*lead, V), seed=99)
    return case


CASES = ("hard_fp32", "bf16_n_valid", "many_3d", "common", "alpha_one", "nan_row")


def weight_tensor(case: dict) -> torch.Tensor | None:
    w = case["weights"]
    return w.clone().requires_grad_() if isinstance(w, torch.Tensor) else None


def call(fn_logits, weights, case: dict, backend: str, **extra):
    """mix_logits for two models with an alpha, mix_logits_many otherwise."""
    from modkern import mix_logits, mix_logits_many
    kw = {**case["kwargs"], **extra, "backend": backend}
    if len(fn_logits) == 2:
        return mix_logits(*fn_logits, weights, **kw)
    return mix_logits_many(fn_logits, weights, **kw)


def run_rank(name: str, backend: str, rank: int, world: int, group) -> dict:
    """This rank's part of a case: its output slice and gradients."""
    case = make_case(name, world)
    pieces = []
    for l, widths in zip(case["logits"], case["widths"]):
        start = sum(widths[:rank])
        pieces.append(l[..., start:start + widths[rank]].clone().requires_grad_())
    w = weight_tensor(case)
    extra = {"group": group}
    if "n_valid" in case["kwargs"]:
        extra["vocab_start"] = sum(case["widths"][0][:rank])
    out = call(pieces, case["weights"] if w is None else w, case, backend, **extra)
    res = {"out": out.detach()}
    if case["g"] is not None:
        start = sum(case["widths"][0][:rank])
        g = case["g"][..., start:start + out.shape[-1]]
        (out.where(torch.isfinite(out), 0.0) * g).sum().backward()
        res["grads"] = [p.grad for p in pieces]
        res["weight_grad"] = None if w is None else w.grad
    return res


def worker(rank: int, world: int, store: str, out_dir: str, cases, backends) -> None:
    """Entry point of each spawned rank: gloo over a file store (no port to pick)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        for name in cases:
            for backend in backends:
                res = run_rank(name, backend, rank, world, dist.group.WORLD)
                torch.save(res, Path(out_dir) / f"{name}-{backend}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(world: int, tmp: Path, cases, backends, timeout: float = 300.0) -> None:
    """Run `worker` in `world` fresh processes; raise on any rank's error or on timeout."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=(world, str(tmp / "store"), str(tmp), cases, backends),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish in {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()

