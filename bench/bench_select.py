"""MoD weight select: modkern against its peers, in one run (docs/design.md 4).

Peers: the paper's formula in eager torch, `torch.compile` of that formula, and a plain
copy of t1 (what the memory system moves at full speed). Each row reports its time and
the achieved rate on the byte floor of its mode:

    out of place: 3 * N * b  (read t1 for min/max, read t1 again, write out; t2 only where
                              selected) -- the copy row reports its own 2 * N * b
    in place:     1 * N * b  (one read of t1; only blocks holding selected elements again)

    pytest bench/bench_select.py --benchmark-only --benchmark-json=select.json
    python bench/report.py select.json

MODKERN_BENCH_SMALL=1 runs tiny shapes without torch.compile (CI checks the code runs).
"""

from __future__ import annotations


import pytest
import torch

import modkern

from _common import DEVICE, SMALL, sync as _sync  # noqa: E402

ALPHA = 0.9
# Qwen2.5 MLP weights: 1.5B and 7B (intermediate x hidden), bf16.
SHAPES = {"small-257x129": (257, 129)} if SMALL else {
    "qwen2.5-1.5b-mlp-8960x1536": (8960, 1536),
    "qwen2.5-7b-mlp-18944x3584": (18944, 3584),
}
IMPLS = ["modkern", "modkern-inplace", "paper-eager", "paper-compiled", "copy"]


def paper_formula(t1: torch.Tensor, t2: torch.Tensor, alpha: float) -> torch.Tensor:
    """The released code's select, op by op in the tensors' dtype."""
    mn, mx = torch.min(t1), torch.max(t1)
    norm = torch.zeros_like(t1) if mn == mx else (t1 - mn) / (mx - mn)
    return torch.where(norm < alpha, t1, t2)


_COMPILED: dict = {}


def _compiled():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(paper_formula, dynamic=False)
    return _COMPILED["fn"]


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    g = torch.Generator().manual_seed(0)
    shape = SHAPES[request.param]
    t1 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16).to(DEVICE)
    t2 = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16).to(DEVICE)
    return request.param, t1, t2


@pytest.mark.parametrize("impl", IMPLS)
def bench_mod_select(benchmark, pair, impl):
    name, t1, t2 = pair
    n_bytes = t1.numel() * t1.element_size()
    benchmark.group = f"mod_select {name} bf16 alpha={ALPHA} ({DEVICE})"
    floor = {"modkern-inplace": 1 * n_bytes, "copy": 2 * n_bytes}.get(impl, 3 * n_bytes)

    if impl == "modkern-inplace":
        work = torch.empty_like(t1)

        def setup():
            work.copy_(t1)
            _sync()
            return (), {}

        def run():
            modkern.mod_select_(work, t2, ALPHA)
            _sync()

        benchmark.pedantic(run, setup=setup, rounds=5 if SMALL else 20, warmup_rounds=1)
        assert torch.equal(work, modkern.mod_select_reference(t1, t2, ALPHA))
    else:
        if impl == "paper-compiled":
            if SMALL:
                pytest.skip("torch.compile is left out of the small (CI) run")
            fn = _compiled()
        else:
            fn = {"modkern": lambda a, b, al: modkern.mod_select(a, b, al),
                  "paper-eager": paper_formula,
                  "copy": lambda a, b, al: a.clone()}[impl]
        fn(t1, t2, ALPHA)  # warm up (and compile) outside the timing

        def run():
            out = fn(t1, t2, ALPHA)
            _sync()
            return out

        out = benchmark(run)
        if impl == "modkern":
            assert torch.equal(out, modkern.mod_select_reference(t1, t2, ALPHA))
    if benchmark.stats is None:  # --benchmark-disable: the code ran once, nothing timed
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update({
        "impl": impl, "elements": t1.numel(), "bytes_floor": floor,
        "gb_per_s": floor / mean / 1e9, "device": _device_name(),
    })


def _device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"
