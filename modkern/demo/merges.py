"""The demo's two checkpoint merges: MoD through `merge_checkpoints` (the path `modkern
merge` takes) and the plain linear average it is compared with."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .report import Row


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def mod_merge_checkpoint(a: Path, b: Path, out: Path, alpha: float) -> Row:
    """MoD merge of checkpoint folders `a` (base, model 1) and `b` into `out` by
    `merge_checkpoints` (the path `modkern merge` takes); a Row of its counts, no accuracy."""
    from ..checkpoint.merge import merge_checkpoints

    report = merge_checkpoints(a, b, out, alpha, progress=False)
    return Row(out.name, "mod", alpha, {}, elements_taken=report.elements_taken,
               elements_merged=report.elements_merged, bytes_read_a=report.bytes_read_base,
               bytes_read_b=report.bytes_read_other, seconds=report.seconds)


def linear_merge_checkpoint(a: Path, b: Path, out: Path, alpha: float) -> Row:
    """alpha * A + (1 - alpha) * B for every floating-point tensor, written to `out`."""
    from safetensors.torch import load_file, save_file

    start = time.perf_counter()
    sd_a = load_file(str(a / "model.safetensors"))
    sd_b = load_file(str(b / "model.safetensors"))
    merged, elements = {}, 0
    for key, t in sd_a.items():
        if t.is_floating_point():
            merged[key] = (alpha * t.double() + (1 - alpha) * sd_b[key].double()).to(t.dtype)
            elements += t.numel()
        else:
            merged[key] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(a, out)
    return Row(out.name, "linear", alpha, {}, elements_merged=elements,
               bytes_read_a=_file_bytes(a), bytes_read_b=_file_bytes(b),
               seconds=time.perf_counter() - start)
