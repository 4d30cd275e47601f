"""GPU: the MoD weight select and merge_state_dicts against their peers, measured in one run
against a device-to-device copy of the same bytes (docs/design.md 4).

Cases (bf16, alpha 0.9; `case` is what gpu_report.py's targets look up):
    select-mlp / select-embed     mod_select out of place on 18944x3584 (Qwen2.5-7B MLP) and
                                  151936x3584 (an embedding); floor 3*N*b; peers: the
                                  paper's formula eager and under torch.compile
    select_-mlp / select_-embed   mod_select_ in place; floor 1*N*b (one read of t1)
    merge-7b / merge_-7b          merge_state_dicts of a Qwen2.5-7B-shaped pair built on the
                                  GPU, out of place (floor 3 * its bytes) and in place (1x)
Each case also has a `copy` row: the yardstick, a copy moving the case's floor bytes.

Times are medians of CUDA-event timings (_common.device_seconds); each row is one
pytest-benchmark round whose extra_info holds the figures. Run by bench/gpu_check.py; skipped
without a GPU except under MODKERN_GPU_DRY_RUN=1 (tiny shapes on the CPU).
"""

from __future__ import annotations

import pytest
import torch

import modkern

from _common import (DEVICE, DRY_RUN, GPU_SKIP_REASON, GPU_SUITE, KERNELS, compiled, emit_row,
                     measure, measure_copy, need_seconds, skip_row, sync)  # noqa: E402
from bench_select import paper_formula  # noqa: E402
from gpu_shapes import QWEN25_7B, TINY, qwen_shapes, random_state_dict, total_bytes  # noqa: E402

pytestmark = pytest.mark.skipif(not GPU_SUITE, reason=GPU_SKIP_REASON)

ALPHA = 0.9
SHAPES = ({"mlp": (257, 129), "embed": (1031, 65)} if DRY_RUN else
          {"mlp": (18944, 3584), "embed": (151936, 3584)})
COMPILE_WARMUP_S = 45  # a cold torch.compile of the formula, for one shape


def select(t1, t2, alpha):
    return modkern.mod_select(t1, t2, alpha, backend=KERNELS)


def select_(t1, t2, alpha):
    return modkern.mod_select_(t1, t2, alpha, backend=KERNELS)


def merge(sd1, sd2, inplace=False):
    return modkern.merge_state_dicts(sd1, sd2, ALPHA, inplace=inplace, backend=KERNELS)


def _free() -> None:
    sync()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _check(benchmark, case: str, impl: str, got, want) -> None:
    """A wrong result is recorded and fails the row: a fast wrong kernel is not a result."""
    ok = (all(torch.equal(got[k], want[k]) for k in want) if isinstance(want, dict)
          else torch.equal(got, want))
    if not ok:
        emit_row(benchmark.group, case, impl, error="result differs from the torch backend")
        pytest.fail(f"{case} {impl}: result differs from the torch backend")


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request):
    g = torch.Generator(DEVICE).manual_seed(0)
    shape = SHAPES[request.param]
    t1, t2 = (torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16).mul_(0.02)
              for _ in range(2))
    yield request.param, t1, t2
    del t1, t2
    _free()


@pytest.mark.parametrize("impl", ["modkern", "paper-eager", "paper-compiled", "copy"])
def bench_gpu_select(benchmark, pair, impl):
    name, t1, t2 = pair
    case, floor = f"select-{name}", 3 * t1.numel() * t1.element_size()
    benchmark.group = f"{case}: mod_select bf16 {tuple(t1.shape)} alpha {ALPHA}, out of place"
    info = {"shape": list(t1.shape), "dtype": "bf16"}
    if impl == "copy":
        measure_copy(benchmark, case=case, floor_bytes=floor, **info)
        return
    fn = {"modkern": select, "paper-eager": paper_formula}.get(impl)
    if impl == "paper-compiled":
        need_seconds(benchmark, case, impl, COMPILE_WARMUP_S)
        fn = compiled(paper_formula, lambda f: f(t1, t2, ALPHA))
        if isinstance(fn, str):
            skip_row(benchmark, case, impl, fn)
    need_seconds(benchmark, case, impl, 5)
    if impl == "modkern":
        _check(benchmark, case, impl, fn(t1, t2, ALPHA),
               modkern.mod_select(t1, t2, ALPHA, backend="torch"))
    measure(benchmark, lambda: fn(t1, t2, ALPHA), case=case, impl=impl, floor_bytes=floor,
            **info)


@pytest.mark.parametrize("impl", ["modkern-inplace", "copy"])
def bench_gpu_select_inplace(benchmark, pair, impl):
    name, t1, t2 = pair
    case, floor = f"select_-{name}", t1.numel() * t1.element_size()
    benchmark.group = f"{case}: mod_select_ bf16 {tuple(t1.shape)} alpha {ALPHA}, in place"
    info = {"shape": list(t1.shape), "dtype": "bf16"}
    if impl == "copy":
        measure_copy(benchmark, case=case, floor_bytes=floor, **info)
        return
    need_seconds(benchmark, case, impl, 5)
    work = t1.clone()
    _check(benchmark, case, impl, select_(work, t2, ALPHA),
           modkern.mod_select(t1, t2, ALPHA, backend="torch"))
    measure(benchmark, lambda: select_(work, t2, ALPHA), case=case, impl=impl,
            floor_bytes=floor, setup=lambda: work.copy_(t1), **info)


@pytest.fixture(scope="module")
def qwen_pair():
    shapes = qwen_shapes(TINY if DRY_RUN else QWEN25_7B)
    sd1, sd2 = random_state_dict(shapes, 0, DEVICE), random_state_dict(shapes, 1, DEVICE)
    sync()
    yield sd1, sd2
    del sd1, sd2
    _free()


@pytest.mark.parametrize("mode, impl", [("out of place", "modkern"), ("out of place", "copy"),
                                        ("in place", "modkern-inplace"), ("in place", "copy")])
def bench_gpu_merge_state_dicts(benchmark, qwen_pair, mode, impl):
    sd1, sd2 = qwen_pair
    inplace = mode == "in place"
    case = "merge_-7b" if inplace else "merge-7b"
    floor = total_bytes(sd1) * (1 if inplace else 3)
    benchmark.group = (f"{case}: merge_state_dicts, Qwen2.5-7B-shaped bf16 pair "
                       f"({total_bytes(sd1) / 1e9:.2f} GB each), {mode}")
    info = {"tensors": len(sd1), "dtype": "bf16"}
    if impl == "copy":
        measure_copy(benchmark, case=case, floor_bytes=floor, **info)
        return
    need_seconds(benchmark, case, impl, 10)
    want = modkern.merge_state_dicts(sd1, sd2, ALPHA, backend="torch")
    if not inplace:
        _check(benchmark, case, impl, merge(sd1, sd2), want)
        del want
        measure(benchmark, lambda: merge(sd1, sd2), case=case,
                impl=impl, floor_bytes=floor, budget_s=1.0, **info)
        return
    work = {k: t.clone() for k, t in sd1.items()}
    _check(benchmark, case, impl, merge(work, sd2, inplace=True), want)
    del want

    def restore():
        torch._foreach_copy_(list(work.values()), list(sd1.values()))

    measure(benchmark, lambda: merge(work, sd2, inplace=True),
            case=case, impl=impl, floor_bytes=floor, setup=restore, budget_s=1.0, **info)
