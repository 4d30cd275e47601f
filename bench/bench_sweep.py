"""Sweeping a merge over alpha (docs/design.md 1.3) against merging at every alpha, side by side
in one run, on a random bf16 state dict shaped like Qwen2.5-0.5B (CPU):

    merge-0.95   one merge_state_dicts at alpha 0.95 (the sweep's first alpha)
    merge-0.5    one merge_state_dicts at alpha 0.5 (its last, the costliest)
    loop-10      merge_state_dicts at each of the 10 alphas 0.95, 0.90, ..., 0.50
    sweep-10     sweep_merges over the same 10 alphas (one working dict, patched)

The target: sweep-10 <= 2x one merge (the mean merge of loop-10), i.e. >= 5x faster than
the loop. Every step of the sweep is checked bit for bit against merge_state_dicts outside
the timings.

    pytest bench/bench_sweep.py --benchmark-only --benchmark-json=sweep.json
    python bench/bench_sweep.py            # the Markdown of bench/results/cpu_sweep.md
    python bench/bench_sweep.py --threads 1

Weights: N(0, 0.02) for matrices, 1 + N(0, 0.02) for norms, as bf16 (Qwen2.5-0.5B: 24
layers, hidden 896, MLP 4864, 2 KV heads, vocab 151936, tied head: 494M elements, ~0.99 GB
per model). MODKERN_BENCH_SMALL=1: 2 small layers and a small vocabulary (CI).
"""

from __future__ import annotations

import os
import platform
import sys
import time

import pytest
import torch

import modkern
from modkern.merging.sweep import MergeSweep, SweepInputs

from _common import SMALL  # noqa: E402  (bench/ is on sys.path)

ALPHAS = [round(0.95 - 0.05 * i, 2) for i in range(10)]
HIDDEN, INTER, KV, LAYERS, VOCAB = (64, 160, 16, 2, 512) if SMALL else \
    (896, 4864, 128, 24, 151936)
ROUNDS = 1 if SMALL else 2
IMPLS = ["merge-0.95", "merge-0.5", "loop-10", "sweep-10"]


def shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj",
                            (KV, HIDDEN)), ("self_attn.v_proj", (KV, HIDDEN))):
            out[p + name + ".weight"], out[p + name + ".bias"] = shape, shape[:1]
        out |= {p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                p + "mlp.up_proj.weight": (INTER, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTER),
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,)}
    out["model.norm.weight"] = (HIDDEN,)
    return out


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes().items():
        t = torch.randn(shape, generator=g) * 0.02
        sd[name] = (t + 1 if "norm" in name else t).to(torch.bfloat16)
    return sd


def merge_loop(sd1, sd2) -> None:
    for alpha in ALPHAS:
        modkern.merge_state_dicts(sd1, sd2, alpha)


def sweep(sd1, sd2) -> None:
    for _ in modkern.sweep_merges(sd1, sd2, ALPHAS):
        pass


RUNS = {"merge-0.95": lambda sd1, sd2: modkern.merge_state_dicts(sd1, sd2, 0.95),
        "merge-0.5": lambda sd1, sd2: modkern.merge_state_dicts(sd1, sd2, 0.5),
        "loop-10": merge_loop, "sweep-10": sweep}


def check_bit_identity(sd1, sd2) -> int:
    """Every step of the sweep against merge_state_dicts (untimed); the sweep's index and
    model-2 values in bytes."""
    swept = MergeSweep(SweepInputs(sd1, sd2), ALPHAS)
    for k, alpha in enumerate(ALPHAS):
        merged = swept.step(k)
        for name, t in modkern.merge_state_dicts(sd1, sd2, alpha).items():
            assert torch.equal(merged[name].view(torch.int16), t.view(torch.int16)), name
    return swept.nbytes


@pytest.fixture(scope="module")
def pair():
    return state_dict(0), state_dict(1)


@pytest.mark.parametrize("impl", IMPLS)
def bench_sweep(benchmark, pair, impl):
    sd1, sd2 = pair
    benchmark.group = f"sweep over {len(ALPHAS)} alphas, Qwen2.5-0.5B-shaped bf16 (cpu)"
    benchmark.pedantic(RUNS[impl], args=(sd1, sd2), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({"impl": impl, "elements": sum(t.numel() for t in sd1.values()),
                                 "threads": torch.get_num_threads()})
    if impl == "sweep-10":
        benchmark.extra_info["state_bytes"] = check_bit_identity(sd1, sd2)


# --- `python bench/bench_sweep.py`: one run, the Markdown table --------------------------

def timed_rounds(sd1, sd2) -> dict[str, float]:
    """The best of ROUNDS wall times of each run, the runs interleaved round by round (so a
    change of the machine's load hits them alike)."""
    best = dict.fromkeys(IMPLS, float("inf"))
    for _ in range(ROUNDS):
        for impl in IMPLS:
            start = time.perf_counter()
            RUNS[impl](sd1, sd2)
            best[impl] = min(best[impl], time.perf_counter() - start)
    return best


def report() -> str:
    load_before = os.getloadavg()[0]
    sd1, sd2 = state_dict(0), state_dict(1)
    elements = sum(t.numel() for t in sd1.values())
    times = timed_rounds(sd1, sd2)
    state = check_bit_identity(sd1, sd2)
    load_after = os.getloadavg()[0]
    mean_merge = times["loop-10"] / len(ALPHAS)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(torch uses {torch.get_num_threads()} threads); Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average {load_before:.2f} before, "
        f"{load_after:.2f} after; best of {ROUNDS} interleaved rounds each.",
        "",
        f"State dict: {elements / 1e6:.0f}M bf16 elements ({elements * 2 / 1e9:.2f} GB per "
        f"model); alphas {', '.join(f'{a:g}' for a in ALPHAS)}.",
        "",
        "| run | seconds | vs one merge (mean of the loop) |",
        "|---|---:|---:|",
    ]
    for impl in IMPLS:
        lines.append(f"| {impl} | {times[impl]:.3f} | {times[impl] / mean_merge:.2f}x |")
    lines += [
        "",
        f"**sweep-10 / mean merge = {times['sweep-10'] / mean_merge:.2f}** (target <= 2); "
        f"loop-10 / sweep-10 = {times['loop-10'] / times['sweep-10']:.2f}x (target >= 5); "
        f"sweep-10 / merge-0.5 = {times['sweep-10'] / times['merge-0.5']:.2f}.",
        "",
        f"The sweep's index and model-2 values: {state / 1e6:.0f} MB "
        f"({state / elements:.2f} bytes per weight; the working dict is one more copy of "
        "the merged tensors). Every step was checked bit for bit against "
        "merge_state_dicts.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--threads"]:
        torch.set_num_threads(int(sys.argv[2]))
    print(report())
