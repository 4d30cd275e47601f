"""mergekit against `modkern merge` on one generated checkpoint pair, in one run.

Each merge runs as a user runs it, as a command in a fresh process started with both inputs
evicted from the page cache; reported per merge: wall time, bytes read from disk by the
process (getrusage ru_inblock, so reads served from the page cache do not count: that is
why the inputs are evicted first) and its peak RSS.

    mergekit linear   `mergekit-yaml`, merge_method linear (0.5 / 0.5): the closest
                      mergekit I/O path (reads both models in full)
    mergekit mod      `modkern-mergekit-yaml`, merge_method mod, alpha 0.9: MoD inside
                      mergekit's loader and writer (modkern.integrations.mergekit)
    modkern merge     `python -m modkern merge BASE OTHER OUT --alpha 0.9` (reads OTHER only
                      where it selects)

The MoD outputs are then checked tensor by tensor: mergekit mod against modkern merge, bit
for bit.

    pytest bench/bench_mergekit.py --benchmark-only -s        # or
    python bench/bench_mergekit.py                             # prints a table

Needs `pip install "modkern[mergekit,bench]"`. Generated checkpoints: Llama-shaped bf16
N(0, 0.02) (hidden 2048, MLP 5632, 20 layers, 32000 vocab; ~2.07 GB per model, 1 GB shards)
with a config.json. MODKERN_BENCH_SMALL=1 makes them tiny; MODKERN_BENCH_DIR chooses where
they are written (default: the system temp folder).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from modkern.checkpoint import page_cache

from _common import (SMALL, scratch_fixture, console_script, main,  # noqa: E402
                     run_command, run_once)

ALPHA = 0.9
HIDDEN, INTER, LAYERS, VOCAB = (64, 160, 2, 256) if SMALL else (2048, 5632, 20, 32000)
HEADS, KV_HEADS = (4, 1) if SMALL else (16, 4)
SHARD_BYTES = 200_000 if SMALL else 1 << 30
HAVE_MERGEKIT = importlib.util.find_spec("mergekit") is not None


def _shapes() -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                   p + "self_attn.k_proj.weight": (kv, HIDDEN),
                   p + "self_attn.v_proj.weight": (kv, HIDDEN),
                   p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                   p + "mlp.up_proj.weight": (INTER, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, INTER)}
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    return shapes


def generate(folder: Path, seed: int) -> None:
    """A sharded bf16 Llama checkpoint (config.json, shards, index), one shard in memory
    at a time: weights N(0, 0.02), norms 1 + N(0, 0.02)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"],
                torch_dtype="bfloat16").save_pretrained(folder)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in _shapes().items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.randn(_shapes()[name], generator=g) * 0.02
            tensors[name] = (t + 1 if "norm" in name else t).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop the files' clean pages from the page cache, so the next read goes to disk."""
    page_cache.evict_files(files)


def run_cold(cmd: list[str], inputs: list[Path]) -> dict:
    """Run `cmd` in a child with `inputs` evicted; its wall time, disk reads, peak RSS."""
    return run_command(cmd, evict=inputs)


def _yaml(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.yml"
    path.write_text(text)
    return path


def compare(out: Path, reference: Path) -> int:
    """Number of tensors of `out` that differ from `reference`'s (bit for bit), or that one
    of them lacks. One tensor in memory at a time."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for f in weight_files(folder):
            with safe_open(f, "pt") as fh:
                found |= {k: f for k in fh.keys()}
        return found

    def load(where: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(where[name], "pt") as fh:
            return fh.get_tensor(name)

    got, want = index(out), index(reference)
    if sorted(got) != sorted(want):
        return len(set(got) ^ set(want))
    bad = 0
    for name in got:
        g, w = load(got, name), load(want, name)
        bad += not (g.dtype == w.dtype and torch.equal(g.view(torch.int16),
                                                       w.view(torch.int16)))
    return bad


def run_benchmark(root: Path) -> dict:
    base, other = root / "base", root / "other"
    t0 = time.perf_counter()
    generate(base, 0)
    generate(other, 1)
    result: dict = {"generate_s": time.perf_counter() - t0,
                    "bytes_base": sum(f.stat().st_size for f in weight_files(base)),
                    "bytes_other": sum(f.stat().st_size for f in weight_files(other))}
    inputs = weight_files(base) + weight_files(other)
    linear = _yaml(root, "linear", f"merge_method: linear\nmodels:\n"
                   f"  - model: {base}\n    parameters:\n      weight: 0.5\n"
                   f"  - model: {other}\n    parameters:\n      weight: 0.5\n"
                   f"dtype: bfloat16\n")
    mod = _yaml(root, "mod", f"merge_method: mod\nbase_model: {base}\nmodels:\n"
                f"  - model: {other}\nparameters:\n  alpha: {ALPHA}\n")
    runs = {"mergekit linear": [console_script("mergekit-yaml"), str(linear), str(root / "linear")],
            "mergekit mod": [console_script("modkern-mergekit-yaml"), str(mod), str(root / "mod")],
            "modkern merge": [sys.executable, "-m", "modkern", "merge", str(base), str(other),
                              str(root / "modkern"), "--alpha", str(ALPHA)]}
    for label, cmd in runs.items():
        result[label] = run_cold(cmd, inputs)
        if label == "mergekit linear":
            shutil.rmtree(root / "linear")  # disk: only the MoD outputs are compared
    result["mod_tensors_differing"] = compare(root / "mod", root / "modkern")
    result["compared_against"] = "modkern merge"
    evict(inputs)
    t0 = time.perf_counter()
    for f in inputs:  # the I/O floor: read both inputs once, front to back
        with open(f, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass
    result["cat_both_s"] = time.perf_counter() - t0
    return result


def format_table(r: dict) -> str:
    gb, size = 1e9, r["bytes_base"] + r["bytes_other"]
    rows = []
    for label in ("mergekit linear", "mergekit mod", "modkern merge"):
        m = r.get(label)
        if isinstance(m, dict):
            rows.append(f"| {label} | {m['wall_s']:.1f} s | {m['read_bytes'] / gb:.2f} GB "
                        f"({m['read_bytes'] / size:.0%}) | {m['peak_rss_bytes'] / gb:.2f} GB |")
        else:
            rows.append(f"| {label} | {m} | | |")
    rows.append(f"| I/O floor: read both inputs once | {r['cat_both_s']:.1f} s | "
                f"{size / gb:.2f} GB (100%) | |")
    head = [f"Inputs: 2 x {r['bytes_base'] / gb:.2f} GB bf16, cold page cache; MoD alpha "
            f"{ALPHA}. MoD outputs differing from {r['compared_against']}: "
            f"{r['mod_tensors_differing']} tensors.", "",
            "| merge | wall time | read from disk (of both inputs) | peak RSS |",
            "|---|---|---|---|"]
    return "\n".join(head + rows)


bench_dir = scratch_fixture("mergekit")


@pytest.mark.skipif(not HAVE_MERGEKIT, reason="mergekit is not installed "
                    "(pip install \"modkern[mergekit]\")")
def bench_mergekit_vs_modkern(benchmark, bench_dir):
    result = run_once(benchmark, "mergekit vs modkern merge (end to end, cold page cache)",
                      run_benchmark, bench_dir, format_table)
    assert result["mod_tensors_differing"] == 0


if __name__ == "__main__":
    main("mergekit", run_benchmark, format_table)
