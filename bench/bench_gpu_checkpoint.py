"""GPU: `merge_checkpoints(..., device="cuda")` end to end on a 2 x 2 GB pair, against the CPU
merge and the I/O floors, in one run (docs/design.md 4).

The pair: Qwen2.5-1.5B's tensor names and shapes with 16 of its 28 layers, bf16
N(0, 0.02), drawn on the GPU and written with modkern's shard writer (1 GB shards) to the
machine's local disk (MODKERN_BENCH_DIR, default the temp folder). Rows (case `ckpt-2gb`),
each a fresh process or pass from a cold page cache, alpha 0.9:
    modkern-cuda   merge with device="cuda" (in the dry run: "cpu"); seconds = the merge's
                   own time, wall_s adds the process start (imports, CUDA context)
    modkern-cpu    the same merge on the CPU; its output must equal the GPU route's bit for bit
    read-base      reading BASE once, front to back (what any merge must at least do)
    copy-base      copying BASE (read, write, fsync): the floor of a merge writing its output
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modkern.checkpoint import page_cache
from modkern.checkpoint.shard_writer import PlannedTensor, ShardWriter, parse_size, plan_shards

from _common import (DEVICE, DRY_RUN, GPU_SKIP_REASON, GPU_SUITE, emit_row, need_seconds,
                     scratch_folder)  # noqa: E402
from bench_checkpoint import cat_seconds, copy_seconds, weight_files  # noqa: E402
from gpu_shapes import QWEN25_1P5B_16L, TINY, qwen_shapes, random_state_dict  # noqa: E402

pytestmark = pytest.mark.skipif(not GPU_SUITE, reason=GPU_SKIP_REASON)

ALPHA = 0.9
SHARD = "200KB" if DRY_RUN else "1GB"
CASE = "ckpt-2gb"
_CHILD = """
import json, sys, modkern
r = modkern.merge_checkpoints(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]),
                              device=sys.argv[5], max_shard_size=sys.argv[6], progress=False)
print(json.dumps({k: getattr(r, k) for k in ("seconds", "bytes_read_base", "bytes_read_other",
                  "bytes_base", "bytes_other", "elements_taken", "elements_merged")}))
"""


def write_model(folder: Path, seed: int) -> None:
    """One model of the pair: drawn on the device, written tensor by tensor."""
    shapes = qwen_shapes(TINY if DRY_RUN else QWEN25_1P5B_16L)
    sd = random_state_dict(shapes, seed, DEVICE)
    folder.mkdir()
    plan = [PlannedTensor(n, torch.bfloat16, s) for n, s in shapes.items()]
    writer = ShardWriter(folder, plan_shards(plan, parse_size(SHARD)))
    for name, t in sd.items():
        writer.write(name, t.cpu())
    writer.finish()


@pytest.fixture(scope="module")
def pair():
    with scratch_folder("gpu-ckpt") as root:
        start = time.perf_counter()
        write_model(root / "base", 0)
        write_model(root / "other", 1)
        yield root, time.perf_counter() - start


def merge_in_child(root: Path, device: str, out: Path) -> dict:
    """A fresh process merges BASE and OTHER (both evicted from the page cache first) on
    `device` into `out`; returns its report and the process's wall time."""
    base, other = root / "base", root / "other"
    page_cache.evict_files(weight_files(base) + weight_files(other))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(other), str(out),
                           str(ALPHA), device, SHARD], stdout=subprocess.PIPE, text=True,
                          check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": time.perf_counter() - start}


def filesystem(path: Path) -> str:
    """The file system type holding `path` (a tmpfs has no page cache to evict: its "cold"
    reads are memory reads)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        pass
    return kind


def same_outputs(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    fa, fb = weight_files(a), weight_files(b)
    if [f.name for f in fa] != [f.name for f in fb]:
        return False
    for x, y in zip(fa, fb):
        ta, tb = load_file(x), load_file(y)
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def _run(impl: str, root: Path) -> dict:
    base = weight_files(root / "base")
    if impl == "read-base":
        return {"seconds": cat_seconds(base)}
    if impl == "copy-base":
        return {"seconds": copy_seconds(base, root / "copy")}
    device = "cuda" if impl == "modkern-cuda" and DEVICE == "cuda" else "cpu"
    result = {**merge_in_child(root, device, root / impl), "merge_device": device}
    if impl == "modkern-cpu" and (root / "modkern-cuda").exists():
        result["identical_to_cuda"] = same_outputs(root / "modkern-cuda", root / impl)
    return result


@pytest.mark.parametrize("impl", ["modkern-cuda", "modkern-cpu", "read-base", "copy-base"])
def bench_gpu_checkpoint_merge(benchmark, pair, impl):
    root, generate_s = pair
    size = _gb(root / "base")
    benchmark.group = f"{CASE}: merge_checkpoints, 2 x {size:.2f} GB bf16, alpha {ALPHA}"
    need_seconds(benchmark, CASE, impl, 15)
    result = benchmark.pedantic(_run, args=(impl, root), rounds=1, iterations=1)
    row = emit_row(benchmark.group, CASE, impl, generate_s=generate_s, fs=filesystem(root),
                   bytes_floor=sum(f.stat().st_size for f in weight_files(root / "base")),
                   **result)
    benchmark.extra_info.update(row)
    if impl == "modkern-cpu":
        for out in root.glob("modkern-*"):
            shutil.rmtree(out)
        assert result.get("identical_to_cuda", True), "the GPU and CPU merges differ"


def _gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in weight_files(folder)) / 1e9
