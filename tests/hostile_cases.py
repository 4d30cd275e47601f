"""The catalogue of hostile inputs to the `modkern` commands (run by test_hostile_inputs.py).

Each case is a function that builds its bad input under a fresh folder and returns a Case:
the command line, the fragments its one error line must hold (the file or key, and what
was expected), and the paths that must be left as they were. Cases register themselves
with `@case(kind, name, how)`; `how` says where it runs: "here" (in the test process),
"unprivileged" (a subprocess without root's permission override, for unreadable files),
"tmpfs" (needs a small tmpfs mounted: a full disk, a read-only folder).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


@dataclass
class Case:
    argv: list[str]
    expect: tuple[str, ...]               # fragments of the one stderr line
    inputs: tuple[Path, ...] = ()         # must be unchanged afterwards
    out: Path | None = None               # must not appear (or, existing, stay as it was)


@dataclass
class Env:
    """What a case builder gets: a fresh folder, and (for "tmpfs" cases) a mount helper and
    the test's monkeypatch."""

    tmp: Path
    mount: Callable[..., Path] | None = None
    monkeypatch: object = None
    cleanup: list = field(default_factory=list)


CASES: dict[str, tuple[str, Callable[[Env], Case]]] = {}


def case(kind: str, name: str, how: str = "here"):
    def register(fn):
        CASES[f"{kind}/{name}"] = (how, fn)
        return fn
    return register


def table(kind: str, build: Callable[..., Case], rows, how: str = "here") -> None:
    """Register one case per row `(name, *args)`, each built by `build(env, *args)`."""
    for name, *args in rows:
        case(kind, name, how)(lambda env, args=tuple(args): build(env, *args))


# ---- building inputs ----------------------------------------------------------------------

def toy_tensors(seed: int, rows: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(rows, 16, generator=g) * 0.02,
            "b.weight": torch.randn(16, 16, generator=g) * 0.02,
            "c.bias": torch.randn(16, generator=g) * 0.02}


def toy(folder: Path, seed: int, shards: int = 1, rows: int = 8) -> Path:
    """A small checkpoint folder: weights (one file, or `shards` shards with an index),
    config.json, tokenizer.json, generation_config.json."""
    folder.mkdir(parents=True)
    sd = toy_tensors(seed, rows)
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(sd)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[i::shards]}
            save_file(part, str(folder / file), metadata={"format": "pt"})
            weight_map |= {n: file for n in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["ToyForCausalLM"], "model_type": "toy", "hidden_size": 16}))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
    (folder / "generation_config.json").write_text('{"max_length": 20}')
    return folder


def merge_case(env: Env, *extra: str, base_shards: int = 1, other_shards: int = 2,
               expect: tuple[str, ...] = ()) -> tuple[Case, Path, Path, Path]:
    base = toy(env.tmp / "base", 0, base_shards)
    other = toy(env.tmp / "other", 1, other_shards)
    out = env.tmp / "out"
    c = Case(["merge", str(base), str(other), str(out), "--alpha", "0.9", *extra], expect,
             (base, other), out)
    return c, base, other, out


def raw_safetensors(path: Path, header: bytes, data: bytes = b"", length: int | None = None
                    ) -> None:
    """A file with the safetensors layout around an arbitrary header."""
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)


def replace_header(path: Path, edit: Callable[[dict], dict | bytes]) -> None:
    """Rewrite a real safetensors file's header with `edit` (dict -> dict or raw bytes),
    keeping the data after it."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8:8 + n]))
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    raw_safetensors(path, header, raw[8 + n:])


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[0]


def set_index(folder: Path, text: str) -> None:
    (folder / "model.safetensors.index.json").write_text(text)


def mknod_char(path: Path) -> None:
    import pytest
    try:
        os.mknod(path, 0o600 | 0o020000, os.makedev(1, 3))  # like /dev/null
    except (PermissionError, OSError) as err:
        pytest.skip(f"cannot create a device node here: {err}")


def outside_file(env: Env, text: str = "SECRET_TOKEN=hf_abc123\n") -> Path:
    secret = env.tmp / "secret.txt"
    secret.write_text(text)
    return secret
