"""End-to-end checkpoint merge: `modkern merge` on a generated pair of multi-GB checkpoints,
against the I/O floor measured in the same run (docs/design.md 4 and 5).

A merge is I/O: it must read BASE once and OTHER only where it selects. Reported:
- wall time of the merge, started with both inputs evicted from the page cache;
- bytes read from each input, as modkern counts them and as the page cache saw them
  (resident pages after the merge, the input evicted before);
- peak RSS of the merging process (it streams: about the largest tensor, never a model);
- the time to read both inputs once, and BASE alone, cat-style (evicted first), and to
  copy BASE (read + write + fsync: what any merge must at least do): the floors.

    pytest bench/bench_checkpoint.py --benchmark-only -s        # or
    python bench/bench_checkpoint.py                             # prints a table

Generated checkpoints: bf16 N(0, 0.02), Llama-shaped (hidden 2048, MLP 5632, 20 layers,
32000 vocab; ~2.07 GB per model, 1 GB shards). MODKERN_BENCH_SMALL=1 makes them tiny;
MODKERN_BENCH_DIR chooses where they are written (default: the system temp folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from modkern.checkpoint import page_cache

from _common import SMALL, scratch_fixture, main, run_once  # noqa: E402  (bench/ on sys.path)

ALPHA = 0.9
HIDDEN, INTER, LAYERS, VOCAB = (64, 160, 2, 256) if SMALL else (2048, 5632, 20, 32000)
SHARD = "200KB" if SMALL else "1GB"


def _shapes() -> dict[str, tuple[int, int]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                   p + "self_attn.k_proj.weight": (HIDDEN // 4, HIDDEN),
                   p + "self_attn.v_proj.weight": (HIDDEN // 4, HIDDEN),
                   p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                   p + "mlp.up_proj.weight": (INTER, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, INTER)}
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def generate(folder: Path, seed: int) -> None:
    """Write a sharded bf16 N(0, 0.02) checkpoint with modkern's own shard writer (one
    tensor in memory at a time)."""
    from modkern.checkpoint.shard_writer import PlannedTensor, ShardWriter, parse_size, plan_shards

    folder.mkdir(parents=True)
    shapes = _shapes()
    plan = [PlannedTensor(n, torch.bfloat16, s) for n, s in shapes.items()]
    writer = ShardWriter(folder, plan_shards(plan, parse_size(SHARD)))
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        writer.write(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.finish()


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def cat_seconds(files: list[Path]) -> float:
    """Read files once, front to back in 8 MB blocks, from a cold page cache."""
    page_cache.evict_files(files)
    buf = bytearray(8 << 20)
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def copy_seconds(files: list[Path], dst: Path) -> float:
    """Copy files once (read in 8 MB blocks, write, fsync), from a cold page cache: the
    floor of any merge that reads BASE and writes an output of its size."""
    page_cache.evict_files(files)
    buf = bytearray(8 << 20)
    dst.mkdir()
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as src, open(dst / f.name, "wb", buffering=0) as out:
            while n := src.readinto(buf):
                out.write(memoryview(buf)[:n])
            os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


# The merge runs in a fresh process; its peak RSS is VmHWM (reset at exec, unlike
# ru_maxrss, which would count the parent's memory copied by fork).
_HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""
_CHILD = _HWM + """
import json, sys, modkern
r = modkern.merge_checkpoints(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]),
                              progress=False)
out = {k: getattr(r, k) for k in ("tensors_merged", "elements_merged", "elements_taken",
       "bytes_read_base", "bytes_read_other", "bytes_base", "bytes_other", "seconds")}
out["peak_rss_bytes"] = hwm()
print(json.dumps(out))
"""


def merge_in_child(base: Path, other: Path, out: Path) -> dict:
    """Run the merge in a fresh process (cold inputs) and return its report, its wall time
    and its peak RSS."""
    page_cache.evict_files(weight_files(base) + weight_files(other))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(other), str(out),
                           str(ALPHA)], stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["other_resident_bytes"] = page_cache.resident_total(weight_files(other))
    result["base_resident_bytes"] = page_cache.resident_total(weight_files(base))
    return result


def import_rss_bytes() -> int:
    """Peak RSS of a process that only imports modkern and torch (the fixed cost)."""
    proc = subprocess.run([sys.executable, "-c", _HWM + "import torch, modkern.checkpoint.merge\n"
                           "print(hwm())"], stdout=subprocess.PIPE, text=True, check=True)
    return int(proc.stdout.split()[-1])


def run_benchmark(root: Path) -> dict:
    base, other, out = root / "base", root / "other", root / "out"
    t0 = time.perf_counter()
    generate(base, 0)
    generate(other, 1)
    gen_s = time.perf_counter() - t0
    merged = merge_in_child(base, other, out)
    floor_both = cat_seconds(weight_files(base) + weight_files(other))
    floor_base = cat_seconds(weight_files(base))
    floor_copy = copy_seconds(weight_files(base), root / "copy")
    largest = max(h * w for h, w in _shapes().values()) * 2
    return {"generate_s": gen_s, **merged, "cat_both_s": floor_both, "cat_base_s": floor_base,
            "copy_base_s": floor_copy, "load_average": os.getloadavg()[0],
            "largest_tensor_bytes": largest, "import_rss_bytes": import_rss_bytes()}


def format_table(r: dict) -> str:
    gb = 1e9
    rows = [
        ("inputs", f"2 x {r['bytes_base'] / gb:.2f} GB bf16 N(0, 0.02), alpha {ALPHA}"),
        ("merge wall time (cold cache)", f"{r['wall_s']:.1f} s "
         f"(in-process {r['seconds']:.1f} s; load average {r['load_average']:.1f})"),
        ("I/O floor: cat BASE + OTHER (cold)", f"{r['cat_both_s']:.1f} s "
         f"({(r['bytes_base'] + r['bytes_other']) / gb / r['cat_both_s']:.2f} GB/s)"),
        ("I/O floor: cat BASE only (cold)", f"{r['cat_base_s']:.1f} s"),
        ("I/O floor: copy BASE, read + write + fsync (cold)", f"{r['copy_base_s']:.1f} s"),
        ("BASE read (counter / page cache)", f"{r['bytes_read_base'] / gb:.3f} GB "
         f"({r['bytes_read_base'] / r['bytes_base']:.1%}) / "
         f"{r['base_resident_bytes'] / r['bytes_base']:.1%}"),
        ("OTHER read (counter / page cache)", f"{r['bytes_read_other'] / 1e6:.1f} MB "
         f"({r['bytes_read_other'] / r['bytes_other']:.2%}) / "
         f"{r['other_resident_bytes'] / 1e6:.1f} MB "
         f"({r['other_resident_bytes'] / r['bytes_other']:.2%})"),
        ("elements taken from OTHER", f"{r['elements_taken']:,} of {r['elements_merged']:,} "
         f"({r['elements_taken'] / r['elements_merged']:.1e})"),
        ("peak RSS of the merge", f"{r['peak_rss_bytes'] / 1e6:.0f} MB (largest tensor "
         f"{r['largest_tensor_bytes'] / 1e6:.0f} MB; importing torch+modkern alone "
         f"{r['import_rss_bytes'] / 1e6:.0f} MB)"),
    ]
    return "\n".join(["| measure | value |", "|---|---|"] +
                     [f"| {a} | {b} |" for a, b in rows])


bench_dir = scratch_fixture("ckpt")


def bench_merge_checkpoints(benchmark, bench_dir):
    result = run_once(benchmark, "checkpoint merge (end to end, cold page cache)",
                      run_benchmark, bench_dir, format_table, impl="modkern merge")
    if not SMALL:  # the targets of docs/design.md 5
        assert result["bytes_read_other"] < 0.05 * result["bytes_other"]
        assert result["other_resident_bytes"] < 0.05 * result["bytes_other"]


if __name__ == "__main__":
    main("ckpt", run_benchmark, format_table)
