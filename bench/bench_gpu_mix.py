"""GPU: mix_logits against its peers, measured in one run against a device-to-device copy of
the same bytes (docs/design.md 4). alpha 0.3, V = 151,936 (Qwen2.5's head).

Cases (`case` is what gpu_report.py's targets look up):
    mix-fwd-bf16 / -fp32      forward on [4096, V]; floor R*V*(2b + 4)
    mix-train-bf16 / -fp32    forward + backward to both logits; floor R*V*(6b + 8)
        peers: the paper's formula (`eager`), the stable logaddexp form in eager torch
        (`logaddexp`) and under torch.compile (`compiled`), and the `copy` yardstick
    decode-1-bf16, decode-8-bf16, decode-1-fp32, decode-8-fp32
        one decoding step on 1 or 8 rows: modkern and the paper's formula, called plainly
        and replayed from a CUDA graph (time per replay); `modkern-graph-tensor-alpha`
        captures with one weight per row as a tensor (guarded: a failure is a row with the
        error; gpu_check.py runs it in a process of its own)

Times are medians of CUDA-event timings (_common.device_seconds). Skipped without a GPU
except under MODKERN_GPU_DRY_RUN=1 (tiny shapes on the CPU, where the graph rows run the
plain call and say so).
"""

from __future__ import annotations

import pytest
import torch

import modkern

from _common import (DEVICE, DRY_RUN, GPU_SKIP_REASON, GPU_SUITE, KERNELS, compiled, emit_row,
                     measure, measure_copy, need_seconds, skip_row, sync)  # noqa: E402
from bench_mix_logits import eager_formula, logaddexp_form  # noqa: E402

pytestmark = [pytest.mark.skipif(not GPU_SUITE, reason=GPU_SKIP_REASON),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

V = 1000 if DRY_RUN else 151_936
ROWS = 8 if DRY_RUN else 4096
ALPHA = 0.3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PEERS = ["modkern", "eager", "logaddexp", "compiled", "copy"]
COMPILE_WARMUP_S = 40  # a cold torch.compile of the logaddexp form, forward and backward
GRAPH = DEVICE == "cuda"


def mix(l1, l2, a):
    return modkern.mix_logits(l1, l2, a, backend=KERNELS)


def _free() -> None:
    sync()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _inputs(rows: int, dtype: torch.dtype, grad: bool = False):
    g = torch.Generator(DEVICE).manual_seed(rows)
    return [torch.randn(rows, V, generator=g, device=DEVICE).mul_(3).to(dtype)
            .requires_grad_(grad) for _ in range(2)]


def _check_forward(benchmark, case: str, l1, l2, a) -> None:
    """modkern against the torch backend on a few rows (figures of a wrong kernel are
    worthless): float32 log-probabilities agree to 1e-3 at this V."""
    rows = slice(0, min(16, l1.shape[0]))
    a_rows = a[rows] if isinstance(a, torch.Tensor) else a
    got = mix(l1[rows].detach(), l2[rows].detach(), a_rows)
    want = modkern.mix_logits(l1[rows].detach(), l2[rows].detach(), a_rows, backend="torch")
    err = (got - want).abs().max().item()
    if not err <= 1e-3:
        emit_row(benchmark.group, case, "modkern", error=f"max |modkern - torch| = {err:.3g}")
        pytest.fail(f"{case}: modkern differs from the torch backend by {err:.3g}")


def _peer(benchmark, case: str, impl: str, warm_up):
    if impl == "modkern":
        return mix
    if impl == "compiled":
        need_seconds(benchmark, case, impl, COMPILE_WARMUP_S)
        fn = compiled(logaddexp_form, warm_up)
        if isinstance(fn, str):
            skip_row(benchmark, case, impl, fn)
        return fn
    return {"eager": eager_formula, "logaddexp": logaddexp_form}[impl]


STEPS = {"fwd": ("forward", 2, 4), "train": ("forward + backward", 6, 8)}  # floor R*V*(xb+y)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("impl", PEERS)
def bench_gpu_mix(benchmark, impl, step, dtype):
    label, per_b, fixed = STEPS[step]
    case, b = f"mix-{step}-{dtype}", DTYPES[dtype].itemsize
    floor = ROWS * V * (per_b * b + fixed)
    benchmark.group = f"{case}: mix_logits {label} [{ROWS}, {V}] {dtype}"
    info = {"rows": ROWS, "V": V, "dtype": dtype}
    if impl == "copy":
        measure_copy(benchmark, case=case, floor_bytes=floor, **info)
        return
    need_seconds(benchmark, case, impl, 8)
    _free()  # the previous row's tensors
    train = step == "train"
    l1, l2 = _inputs(ROWS, DTYPES[dtype], grad=train)
    grad_out = torch.randn(ROWS, V, device=DEVICE) if train else None

    def run(f):
        if not train:
            return f(l1, l2, ALPHA)
        l1.grad = l2.grad = None
        out = f(l1, l2, ALPHA)
        out.backward(grad_out.to(out.dtype))

    fn = _peer(benchmark, case, impl, run)
    if impl == "modkern":
        _check_forward(benchmark, case, l1, l2, ALPHA)
    measure(benchmark, lambda: run(fn), case=case, impl=impl, floor_bytes=floor, **info)


def _replayable(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, as capture needs):
    returns (replay, the captured output). On the CPU (dry run): (fn, fn())."""
    if not GRAPH:
        return fn, fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


# Plain calls first: a capture that fails can leave the process unable to run later rows.
DECODE = ["modkern", "eager", "modkern-graph", "eager-graph", "modkern-graph-tensor-alpha"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("impl", DECODE)
def bench_gpu_decode(benchmark, impl, rows, dtype):
    case, b = f"decode-{rows}-{dtype}", DTYPES[dtype].itemsize
    benchmark.group = f"{case}: one decoding step, [{rows}, {V}] {dtype}"
    info = {"rows": rows, "V": V, "dtype": dtype, "graph": GRAPH and "graph" in impl}
    l1, l2 = _inputs(rows, DTYPES[dtype])
    alpha = (torch.linspace(0.2, 0.8, rows, device=DEVICE) if "tensor-alpha" in impl
             else ALPHA)
    fn = mix if impl.startswith("modkern") else eager_formula
    if impl == "modkern":
        _check_forward(benchmark, case, l1, l2, alpha)
    call = lambda: fn(l1, l2, alpha)  # noqa: E731
    if "graph" in impl:
        try:
            call, out = _replayable(call)
            call()
            sync()
            if not torch.allclose(out, fn(l1, l2, alpha), atol=1e-5, equal_nan=True):
                raise AssertionError("the replayed graph's output differs from a plain call")
        except Exception as e:  # a host sync inside mix_logits cannot be captured
            first = (str(e).splitlines() or [""])[0][:300]
            emit_row(benchmark.group, case, impl, error=f"{type(e).__name__}: {first}", **info)
            pytest.fail(f"{case} {impl}: {type(e).__name__}: {first}")
    measure(benchmark, call, case=case, impl=impl, floor_bytes=rows * V * (2 * b + 4),
            budget_s=0.2, inner=1 if DRY_RUN else 50, **info)
