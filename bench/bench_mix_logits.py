"""mix_logits against its peers, side by side in one run (docs/design.md 4).

    pytest bench/bench_mix_logits.py --benchmark-only            # full shapes
    MODKERN_BENCH_THREADS=1 pytest bench/bench_mix_logits.py --benchmark-only  # one thread
    MODKERN_BENCH_SMALL=1 pytest bench/bench_mix_logits.py       # tiny shapes, no compile

Peers on the same inputs (alpha = 0.3, V = 151,936, Qwen2.5's head):
- `eager`: the paper's formula `log(a*softmax(l1) + (1-a)*softmax(l2))` in eager torch
  (in the inputs' dtype, as written);
- `logaddexp`: the stable form `logaddexp(log a + log_softmax(l1), log(1-a) +
  log_softmax(l2))` in eager torch, float32;
- `compiled`: torch.compile of the logaddexp form (skipped, with the reason, where it cannot
  compile; skipped under MODKERN_BENCH_SMALL);
- `modkern`: modkern.mix_logits (Triton on a GPU, the chunked torch path on the CPU).

Rows 1, 8, 64 are decoding steps (forward only); 8,192 rows are a training step (forward and
backward to both logits). On the CPU the training step uses 256 rows (8,192 rows of 152K
float32 logits are 5 GB per tensor; the eager peers would need several of them).
extra_info records the byte floor, achieved GB/s against it and the peak memory:
- floor (forward): R*V*(2b + 4) bytes, both inputs read once, float32 output written once;
  (training): R*V*(6b + 8): the forward, then g read (4), both inputs read (2b) and both
  gradients written (2b);
- peak memory: on CUDA max_memory_allocated above the inputs; on the CPU the process's peak
  RSS above the level before the call (Linux /proc, reset per measurement).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

import modkern

from _common import DEVICE, SMALL, sync as _sync  # noqa: E402

# MODKERN_BENCH_THREADS=1 pins every peer to one CPU thread: on a machine whose cores are
# shared with other jobs, OpenMP's barriers make multi-threaded timings mostly noise.
if os.environ.get("MODKERN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MODKERN_BENCH_THREADS"]))
CUDA = DEVICE == "cuda"
V = 1000 if SMALL else 151_936
ALPHA = 0.3
DECODE_ROWS = (1, 4) if SMALL else (1, 8, 64)
TRAIN_ROWS = 8 if SMALL else (8192 if CUDA else 256)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("modkern", "eager", "logaddexp", "compiled")


def eager_formula(l1, l2, a):
    return torch.log(a * torch.softmax(l1, -1) + (1 - a) * torch.softmax(l2, -1))


def logaddexp_form(l1, l2, a):
    return torch.logaddexp(torch.log_softmax(l1.float(), -1) + math.log(a),
                           torch.log_softmax(l2.float(), -1) + math.log1p(-a))


def modkern_mix(l1, l2, a):
    return modkern.mix_logits(l1, l2, a)


_COMPILED: dict = {}


def compiled_form():
    if SMALL:
        pytest.skip("torch.compile is skipped under MODKERN_BENCH_SMALL=1")
    if "fn" not in _COMPILED:
        try:
            fn = torch.compile(logaddexp_form, dynamic=False)
            x = torch.randn(2, 64, device=DEVICE, requires_grad=True)
            fn(x, x, ALPHA).sum().backward()  # compile here, not inside the timing
            _COMPILED["fn"] = fn
        except Exception as e:  # no compiler toolchain, unsupported platform, ...
            _COMPILED["fn"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if isinstance(_COMPILED["fn"], str):
        pytest.skip(f"torch.compile cannot compile here: {_COMPILED['fn']}")
    return _COMPILED["fn"]


def implementation(name):
    if name == "compiled":
        return compiled_form()
    return {"modkern": modkern_mix, "eager": eager_formula, "logaddexp": logaddexp_form}[name]


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak_memory_mb(fn) -> float | None:
    """Memory the call needs above what exists before it (output included), in MiB."""
    if CUDA:
        _sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = _rss_kb("VmRSS")
        fn()
        return (_rss_kb("VmHWM") - base) / 1024
    except OSError:
        return None


def _record(benchmark, floor_bytes, fn, name, rows, dtype):
    benchmark.extra_info.update({
        "impl": name, "rows": rows, "V": V, "dtype": dtype, "device": DEVICE,
        "threads": torch.get_num_threads(), "bytes_floor": floor_bytes,
        "peak_mem_mb": peak_memory_mb(fn),
    })
    if SMALL:  # CI: run once, timings off
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return
    big = not CUDA and rows * V > 4 * 10 ** 6
    benchmark.pedantic(fn, rounds=3 if big else 15, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["seconds"] = seconds
    benchmark.extra_info["gb_per_s"] = floor_bytes / seconds / 1e9


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows", DECODE_ROWS)
@pytest.mark.parametrize("impl", IMPLS)
def test_decode(benchmark, impl, rows, dtype):
    """One decoding step: forward only."""
    fn_impl = implementation(impl)
    dt = DTYPES[dtype]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    l1 = torch.randn(rows, V, device=DEVICE, generator=g).mul_(3).to(dt)
    l2 = torch.randn(rows, V, device=DEVICE, generator=g).mul_(3).to(dt)

    def run():
        out = fn_impl(l1, l2, ALPHA)
        _sync()
        return out

    benchmark.group = f"decode rows={rows} {dtype}"
    b = l1.element_size()
    _record(benchmark, rows * V * (2 * b + 4), run, impl, rows, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_train(benchmark, impl, dtype):
    """One training step of a distillation target: forward and backward to both logits."""
    fn_impl = implementation(impl)
    dt = DTYPES[dtype]
    rows = TRAIN_ROWS
    g = torch.Generator(device=DEVICE).manual_seed(0)
    l1 = torch.randn(rows, V, device=DEVICE, generator=g).mul_(3).to(dt).requires_grad_()
    l2 = torch.randn(rows, V, device=DEVICE, generator=g).mul_(3).to(dt).requires_grad_()
    grad_out = torch.randn(rows, V, device=DEVICE, generator=g)

    def run():
        l1.grad = l2.grad = None
        out = fn_impl(l1, l2, ALPHA)
        out.backward(grad_out.to(out.dtype))
        _sync()

    benchmark.group = f"train rows={rows} {dtype}"
    b = l1.element_size()
    _record(benchmark, rows * V * (6 * b + 8), run, impl, rows, dtype)
