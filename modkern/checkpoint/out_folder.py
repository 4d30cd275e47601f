"""The output folder of a checkpoint merge: where it may go, the disk space it needs, and
the files copied into it from BASE beside the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from .report import format_bytes

# Files copied from BASE into the output, beside the weights (top level only).
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
          "vocab.txt", "merges.txt", "chat_template.json", "chat_template.jinja",
          "spiece.model", "preprocessor_config.json")


def check_out_path(base: Path, other: Path, out: Path, force: bool) -> None:
    for label, src in (("BASE", base), ("OTHER", other)):
        if out == src or src in out.parents:
            raise CheckpointError(f"OUT {out}: is {'the' if out == src else 'inside'} {label} "
                                  f"folder {src}; expected a folder outside both inputs")
        if out in src.parents:
            raise CheckpointError(f"OUT {out}: contains {label} folder {src}; expected a "
                                  "folder outside both inputs")
    if out.exists() or out.is_symlink():
        if not force:
            raise CheckpointError(f"OUT {out}: already exists; expected a new folder (pass "
                                  "--force / force=True to replace it)")
        if not out.is_dir():
            raise CheckpointError(f"OUT {out}: exists and is not a folder; expected a folder "
                                  "(remove it yourself)")


def check_space(out: Path, needed: int) -> None:
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise CheckpointError(f"OUT {out}: not enough disk space: the merge writes "
                              f"{format_bytes(needed)} but {probe} has {format_bytes(free)} "
                              "free; expected at least that much free")


def copy_base_files(base: Path, tmp: Path, copied: list[str],
                     out_dtype: torch.dtype | None) -> None:
    for name in copied:
        src, dst = base / name, tmp / name
        if name == "config.json" and out_dtype is not None:
            config = json.loads(src.read_text(encoding="utf-8"))
            dtype_name = str(out_dtype).removeprefix("torch.")
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for k in keys:
                config[k] = dtype_name
            dst.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, dst)
