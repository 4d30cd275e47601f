"""Finding the weights of a Hugging Face checkpoint folder and checking they are complete.

A folder holds `model.safetensors`, or shards named in `model.safetensors.index.json`
(`weight_map`: tensor name -> shard file), beside `config.json` and tokenizer files. Pickled
`.bin`/`.pt` weights are refused: loading them runs arbitrary code, and they cannot be read
piecewise. Opening a checkpoint parses and validates every shard's header (names, dtypes,
shapes, offsets, file sizes) and reads no tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError
from .safetensors_io import SafetensorsReader, TensorInfo

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# config.json keys that fix the tensors' meaning: both models must agree on them.
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers",
             "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
             "head_dim")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "*.bin", "*.pt",
           "*.pth", "*.ckpt")

CONVERT_HINT = (
    "convert it once with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True) "
    "(and copy the tokenizer), then merge NEW_DIR"
)


def _pickled_files(folder: Path) -> list[str]:
    return sorted({p.name for pat in PICKLED for p in folder.glob(pat) if p.is_file()})


def weight_files(folder: Path, label: str) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, when sharded, the index's weight map.

    `label` names the model in errors ("BASE", "OTHER"). Raises CheckpointError for a
    missing folder, pickled weights only, an unreadable index, or shards the index names
    that are absent."""
    if not folder.exists():
        raise CheckpointError(f"{label} {folder}: no such folder; expected a Hugging Face "
                              "checkpoint folder (model.safetensors or shards with "
                              f"{INDEX}, config.json)")
    if not folder.is_dir():
        raise CheckpointError(f"{label} {folder}: is a file; expected a checkpoint folder")
    single, index = folder / SINGLE, folder / INDEX
    if single.is_file():  # preferred when both exist, as transformers does
        return [single], None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{label} {index}: unreadable index; expected JSON with a "
                                  "'weight_map' of tensor name -> shard file") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            shard = folder / name
            tensor = next(k for k, v in weight_map.items() if v == name)
            if Path(name).name != name:
                raise CheckpointError(f"{label} {index}: shard {name!r} (for tensor {tensor!r}) "
                                      "is not a file name in the checkpoint folder; expected "
                                      "shards beside the index")
            if not shard.is_file():
                raise CheckpointError(f"{label} {shard}: shard listed in {INDEX} (for tensor "
                                      f"{tensor!r} and others) is missing; expected the file "
                                      "to exist (incomplete download?)")
        return [folder / f for f in files], weight_map
    pickled = _pickled_files(folder)
    if pickled:
        raise CheckpointError(f"{label} {folder}: has only pickled weights ({', '.join(pickled)}); "
                              f"modkern reads safetensors only: {CONVERT_HINT}")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)})" if others else ""
    raise CheckpointError(f"{label} {folder}: no {SINGLE} and no {INDEX}{hint}; expected a "
                          "Hugging Face checkpoint folder")


class Checkpoint:
    """A checkpoint folder's tensors: name -> (open reader, TensorInfo), validated.

    Use as a context manager (it keeps one file descriptor per shard open)."""

    def __init__(self, folder: str | Path, label: str, pattern: str = "sequential"):
        self.folder = Path(folder)
        self.label = label
        files, weight_map = weight_files(self.folder, label)
        self.readers: list[SafetensorsReader] = []
        self.where: dict[str, SafetensorsReader] = {}
        try:
            for path in files:
                try:
                    reader = SafetensorsReader(path, pattern)
                except CheckpointError as err:
                    raise CheckpointError(f"{label} {err}") from None
                self.readers.append(reader)
                for name in reader.tensors:
                    if name in self.where:
                        raise CheckpointError(f"{label} {path}: tensor {name!r} also in "
                                              f"{self.where[name].path.name}; expected each "
                                              "tensor in one shard")
                    if weight_map is not None and weight_map.get(name) != path.name:
                        raise CheckpointError(f"{label} {path}: tensor {name!r} is not mapped "
                                              f"to this shard in {INDEX}; the index and shards "
                                              "disagree")
                    self.where[name] = reader
            if weight_map is not None:
                for name, file in weight_map.items():
                    if name not in self.where:
                        raise CheckpointError(f"{label} {self.folder / file}: tensor {name!r} "
                                              f"listed in {INDEX} is not in that shard")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for r in self.readers:
            r.close()

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def names(self) -> list[str]:
        """Tensor names in reading order: shard by shard, by offset (sequential I/O)."""
        return [n for r in self.readers for n in r.tensors]

    def items(self) -> Iterator[tuple[str, TensorInfo]]:
        for r in self.readers:
            yield from r.tensors.items()

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers)

    @property
    def weight_bytes(self) -> int:
        """Total size of the weight files."""
        return sum(r.size for r in self.readers)

    def config(self) -> dict:
        """config.json as a dict ({} when absent)."""
        path = self.folder / "config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.label} {path}: unreadable config ({err}); expected "
                                  "JSON") from None


def check_configs(c1: dict, c2: dict, base: Path, other: Path) -> None:
    for key in ARCH_KEYS:
        if key in c1 and key in c2 and c1[key] != c2[key]:
            raise CheckpointError(f"config.json: {key} differs: BASE {base} has {c1[key]!r}, "
                                  f"OTHER {other} has {c2[key]!r}; expected the same "
                                  "architecture and shapes")
