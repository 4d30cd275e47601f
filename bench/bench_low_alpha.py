"""Low alpha: `modkern merge` against MoD in mergekit on a SmolLM-135M-shaped pair, alpha
0.9 down to 0.1, and the measurement behind the rule that decides how OTHER is read
(modkern.ops.select_source.DENSE_FRACTION).

1. crossover: one group's range (SPAN_GROUP blocks: 4M bf16 elements) of OTHER merged by
   each route of the checkpoint merge's select (select_pipeline.take_by_groups):
   positioned reads of the pages that hold the selected elements (their indices built
   first), or one read of the whole range and a mask patch; at selected fractions from
   1e-5 to 0.5, with the file evicted from the page cache (cold) and resident (warm).
   Median of REPS runs.
2. sweep: each merge a fresh process, as a user runs it: `modkern merge` and
   `modkern-mergekit-yaml` (merge_method mod: the same MoD merge inside mergekit's loader
   and writer), at each alpha, cold (both inputs evicted first) and warm (both read once
   before), REPS rounds interleaved: the best wall time, the highest peak RSS, and
   modkern's own count of OTHER's bytes (its recipe). At alpha 0.5 mergekit's output is
   compared with modkern's, tensor by tensor.

    python bench/bench_low_alpha.py                          # prints the tables
    pytest bench/bench_low_alpha.py --benchmark-only -s

The pair: transformers' LlamaConfig shaped like SmolLM-135M (hidden 576, 30 layers, MLP
1536, 9 heads, 3 KV heads, vocab 49152, tied embeddings: 134.5M parameters, 269 MB bf16,
one model.safetensors each). BASE: weights N(0, 0.02), norms 1 + N(0, 0.02); OTHER: BASE
plus N(0, 0.01) noise. Needs `modkern[mergekit,bench]`. MODKERN_BENCH_SMALL=1: a tiny
config; MODKERN_BENCH_DIR: where the pair is written.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from modkern.checkpoint import page_cache
from modkern.checkpoint.safetensors_io import SafetensorsReader
from modkern.ops import select_source
from modkern.ops.select_engine import engine_for
from modkern.ops.select_pipeline import take_by_groups
from modkern.ops.select_torch import BLOCK, SPAN_GROUP

from _common import (SMALL, scratch_fixture, console_script, main,  # noqa: E402
                     run_command, run_once)
from bench_mergekit import compare  # noqa: E402

ALPHAS = (0.9, 0.1) if SMALL else (0.9, 0.7, 0.5, 0.3, 0.1)
FRACTIONS = (1e-3, 0.5) if SMALL else (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1,
                                       0.5)
REPS = 1 if SMALL else 3
COMPARED_AT = 0.1 if SMALL else 0.5
HAVE_MERGEKIT = importlib.util.find_spec("mergekit") is not None
EMBED = "model.embed_tokens.weight"


def config():
    """SmolLM-135M's shape (MODKERN_BENCH_SMALL: a tiny one), random weights."""
    from transformers import LlamaConfig
    dims = (dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096) if SMALL else
            dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    return LlamaConfig(**dims, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
                       torch_dtype="bfloat16")


def generate_pair(root: Path) -> tuple[Path, Path]:
    """BASE and OTHER folders (config.json + model.safetensors), shapes from transformers'
    own Llama model built on the meta device (so no weights are initialized)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg = config()
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    sds: tuple[dict, dict] = ({}, {})
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g) * 0.02 + (1.0 if "norm" in name else 0.0)
        sds[0][name] = w.to(torch.bfloat16)
        sds[1][name] = (w + torch.randn(shape, generator=g) * 0.01).to(torch.bfloat16)
    folders = (root / "base", root / "other")
    for folder, sd in zip(folders, sds):
        folder.mkdir(parents=True)
        cfg.save_pretrained(folder)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folders


def route_ms(reader: SafetensorsReader, t1: torch.Tensor, v: torch.Tensor,
             fraction: float, cold: bool) -> float:
    """Median milliseconds of take_by_groups on t1 with OTHER's embedding range, the route
    forced by DENSE_FRACTION = `fraction`."""
    engine, path, times = engine_for("torch"), reader.path, []
    saved = select_source.DENSE_FRACTION
    try:
        select_source.DENSE_FRACTION = fraction
        for _ in range(REPS):
            if cold:
                page_cache.evict(path)
            else:
                reader.read_range(EMBED, 0, t1.numel())
            flat = t1.clone()
            start = time.perf_counter()
            take_by_groups(flat, select_source.ReaderSource(reader, EMBED), engine, v,
                           torch.empty(0))
            times.append(time.perf_counter() - start)
    finally:
        select_source.DENSE_FRACTION = saved
    return statistics.median(times) * 1e3


def crossover(other: Path) -> list[dict]:
    """Per selected fraction, each route's time on one group's range, cold and warm."""
    g = torch.Generator().manual_seed(2)
    rows = []
    with SafetensorsReader(other / "model.safetensors", "random") as reader:
        span = min(SPAN_GROUP * BLOCK, reader.tensors[EMBED].numel // BLOCK * BLOCK)
        for fraction in FRACTIONS:
            t1 = torch.randn(span, generator=g).to(torch.bfloat16)
            k = max(1, round(fraction * span))  # v: the k-th largest value
            v = torch.kthvalue(t1.float(), span - k + 1).values.to(torch.bfloat16)
            row = {"fraction": int((t1 >= v).sum()) / span}
            for cache in ("cold", "warm"):
                row[f"pages_{cache}_ms"] = route_ms(reader, t1, v, 2.0, cache == "cold")
                row[f"range_{cache}_ms"] = route_ms(reader, t1, v, 0.0, cache == "cold")
            rows.append(row)
    return rows


def merge_command(tool: str, alpha: float, pair: tuple[Path, Path], out: Path) -> list[str]:
    """The command line of a merge by `tool` ("modkern" or "mergekit") into `out`."""
    base, other = pair
    if tool == "modkern":
        return [sys.executable, "-m", "modkern", "merge", str(base), str(other), str(out),
                "--alpha", str(alpha), "--quiet"]
    recipe = out.with_suffix(".yml")
    recipe.write_text(f"merge_method: mod\nbase_model: {base}\nmodels:\n"
                      f"  - model: {other}\nparameters:\n  alpha: {alpha}\n")
    return [console_script("modkern-mergekit-yaml"), str(recipe), str(out)]


def merge_once(cmd: list[str], inputs: list[Path], out: Path, cold: bool) -> dict:
    """One merge in a fresh process, its inputs evicted first (cold) or read once (warm)."""
    shutil.rmtree(out, ignore_errors=True)
    if not cold:
        for f in inputs:
            f.read_bytes()
    return run_command(cmd, evict=inputs if cold else [])


def sweep(root: Path, pair: tuple[Path, Path]) -> dict:
    """Every alpha: REPS rounds of both tools, cold and warm, interleaved (so that a burst
    of load elsewhere hits both alike): the best wall time, the highest peak RSS, modkern's
    counts from its recipe; outputs compared at COMPARED_AT."""
    runs: dict = {}
    tools = ("modkern", "mergekit") if HAVE_MERGEKIT else ("modkern",)
    inputs = [folder / "model.safetensors" for folder in pair]
    for alpha in ALPHAS:
        times: dict = {}
        for _ in range(REPS):
            for tool in tools:
                for cache in ("cold", "warm"):
                    out = root / f"{tool}-{alpha}-{cache}"
                    cmd = merge_command(tool, alpha, pair, out)
                    times.setdefault(f"{tool} {alpha} {cache}", []).append(
                        merge_once(cmd, inputs, out, cache == "cold"))
        for key, done in times.items():
            runs[key] = {"wall_s": min(r["wall_s"] for r in done),
                         "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done)}
        counts = yaml.safe_load((root / f"modkern-{alpha}-cold" / "modkern_recipe.yaml"
                                 ).read_text())["result"]
        runs[f"modkern {alpha} cold"] |= {k: counts[k] for k in (
            "bytes_read_other", "elements_taken", "elements_merged")}
        if HAVE_MERGEKIT and alpha == COMPARED_AT:
            runs["tensors_differing"] = compare(root / f"mergekit-{alpha}-cold",
                                                root / f"modkern-{alpha}-cold")
        for out in root.glob(f"*-{alpha}-*"):  # disk: one alpha's outputs at a time
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink()
    return runs


def run_benchmark(root: Path) -> dict:
    load_before = os.getloadavg()[0]
    pair = generate_pair(root)
    with SafetensorsReader(pair[0] / "model.safetensors") as reader:
        largest = max(i.nbytes for i in reader.tensors.values())
    imports = [sys.executable, "-c", "import torch, modkern.checkpoint.merge"]
    return {"load_before": load_before, "crossover": crossover(pair[1]),
            "runs": sweep(root, pair), "load_after": os.getloadavg()[0],
            "bytes_base": (pair[0] / "model.safetensors").stat().st_size,
            "largest_tensor_bytes": largest,
            "import_rss_bytes": run_command(imports)["peak_rss_bytes"]}


def sweep_rows(r: dict) -> list[str]:
    """One table row per alpha: times (best of REPS), peak RSS (modkern's also above the
    import baseline), OTHER's bytes read by modkern."""
    mb, runs, rows = 1e6, r["runs"], []
    for alpha in ALPHAS:
        m = [runs[f"modkern {alpha} {c}"] for c in ("cold", "warm")]
        k = [runs.get(f"mergekit {alpha} {c}") for c in ("cold", "warm")]
        m_rss = max(x["peak_rss_bytes"] for x in m)
        kit = "- | -" if k[0] is None else (
            f"{k[0]['wall_s']:.1f} / {k[1]['wall_s']:.1f} s | "
            f"{k[0]['wall_s'] / m[0]['wall_s']:.1f}x / {k[1]['wall_s'] / m[1]['wall_s']:.1f}x")
        kit_rss = "-" if k[0] is None else f"{max(x['peak_rss_bytes'] for x in k) / mb:.0f} MB"
        rows.append(f"| {alpha} | {m[0]['elements_taken'] / m[0]['elements_merged']:.2g} | "
                    f"{m[0]['wall_s']:.1f} / {m[1]['wall_s']:.1f} s | {kit} | "
                    f"{m_rss / mb:.0f} MB (+{(m_rss - r['import_rss_bytes']) / mb:.0f}) | "
                    f"{kit_rss} | {m[0]['bytes_read_other'] / r['bytes_base']:.1%} |")
    return rows


def format_table(r: dict) -> str:
    mb = 1e6
    bound = 2 * r["largest_tensor_bytes"] + r["bytes_base"]
    lines = [f"Load average {r['load_before']:.2f} before, {r['load_after']:.2f} after. "
             f"Inputs 2 x {r['bytes_base'] / mb:.0f} MB bf16 (one file each); largest tensor "
             f"{r['largest_tensor_bytes'] / mb:.1f} MB; importing torch and modkern "
             f"{r['import_rss_bytes'] / mb:.0f} MB; the bound on modkern's peak RSS above "
             f"that: 2 x largest + one shard = {bound / mb:.0f} MB. Times: best of {REPS}.",
             "", "| alpha | taken from OTHER | modkern cold / warm | mergekit cold / warm | "
             "modkern's speed-up | modkern peak RSS (above import) | mergekit peak RSS | "
             "OTHER read by modkern |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
             *sweep_rows(r)]
    if "tensors_differing" in r["runs"]:
        lines += ["", f"mergekit's MoD output against modkern's at alpha {COMPARED_AT}: "
                  f"{r['runs']['tensors_differing']} tensors differ."]
    lines += ["", "Crossover, one group of 4M bf16 elements of OTHER (median ms): positioned "
              "reads of the selected elements' pages vs one read of the range + mask patch.",
              "", "| fraction taken | pages, cold | range, cold | pages, warm | range, warm |",
              "|---:|---:|---:|---:|---:|"]
    for row in r["crossover"]:
        lines.append(f"| {row['fraction']:.1e} | {row['pages_cold_ms']:.2f} | "
                     f"{row['range_cold_ms']:.2f} | {row['pages_warm_ms']:.2f} | "
                     f"{row['range_warm_ms']:.2f} |")
    return "\n".join(lines)


bench_dir = scratch_fixture("low-alpha")


def bench_low_alpha(benchmark, bench_dir):
    result = run_once(benchmark, "low alpha: modkern merge vs mergekit (SmolLM-135M shape)",
                      run_benchmark, bench_dir, format_table)
    if HAVE_MERGEKIT and "tensors_differing" in result["runs"]:
        assert result["runs"]["tensors_differing"] == 0


if __name__ == "__main__":
    main("low-alpha", run_benchmark, format_table)
