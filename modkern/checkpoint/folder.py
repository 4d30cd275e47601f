"""Finding the weights of a Hugging Face checkpoint folder and checking they are complete.

A folder holds `model.safetensors`, or shards named in `model.safetensors.index.json`
(`weight_map`: tensor name -> shard file), beside `config.json` and tokenizer files. Pickled
`.bin`/`.pt` weights are refused: loading them runs arbitrary code, and they cannot be read
piecewise. Opening a checkpoint parses and validates every shard's header (names, dtypes,
shapes, offsets, file sizes) and reads no tensor data.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError
from .input_files import check_input_file, file_kind, open_input, parse_json, read_input
from .safetensors_io import SafetensorsReader, TensorInfo

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# config.json keys that fix the tensors' meaning: both models must agree on them.
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers",
             "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
             "head_dim")
# Files beside the weights that a merge copies from BASE (top level only); OTHER's are hashed.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
              "vocab.txt", "merges.txt", "chat_template.json", "chat_template.jinja",
              "spiece.model", "preprocessor_config.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "*.bin", "*.pt",
           "*.pth", "*.ckpt")

CONVERT_HINT = (
    "convert it once with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True) "
    "(and copy the tokenizer), then merge NEW_DIR"
)


def _pickled_files(folder: Path) -> list[str]:
    return sorted({p.name for pat in PICKLED for p in folder.glob(pat) if p.is_file()})


def check_folder(folder: Path, label: str) -> None:
    """CheckpointError unless `folder` is a readable directory (`label` names the model)."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        raise CheckpointError(f"{label} {folder}: no such folder; expected a Hugging Face "
                              f"checkpoint folder (model.safetensors or shards with {INDEX}, "
                              "config.json)") from None
    except OSError as err:
        raise CheckpointError(f"{label} {folder}: cannot access: {err.strerror}; expected a "
                              "readable checkpoint folder") from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a file" if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
        raise CheckpointError(f"{label} {folder}: is {what}; expected a checkpoint folder")
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as err:
        raise CheckpointError(f"{label} {folder}: cannot read the folder: {err.strerror}; "
                              "expected a readable checkpoint folder") from None


def _weight_map(raw: bytes, index: Path, label: str) -> dict[str, str]:
    expected = "JSON with a 'weight_map' of tensor name -> shard file"
    data = parse_json(raw, f"{label} {index}: unreadable index", expected, allow_nan=False)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{label} {index}: unreadable index (no 'weight_map' object of "
                              f"strings); expected {expected}")
    if not weight_map:
        raise CheckpointError(f"{label} {index}: the weight_map is empty; expected the "
                              "checkpoint's tensors")
    return weight_map


def _shards(folder: Path, weight_map: dict[str, str], label: str) -> list[Path]:
    """The shard files an index names, each checked under the input-file rule."""
    index = folder / INDEX
    seen: dict[Path, str] = {}
    first_tensor: dict[str, str] = {}
    for tensor, name in weight_map.items():
        first_tensor.setdefault(name, tensor)
    for name in sorted(first_tensor):
        tensor = first_tensor[name]
        if Path(name).name != name or name in ("", ".", "..") or "\0" in name:
            raise CheckpointError(f"{label} {index}: shard {name!r} (for tensor {tensor!r}) "
                                  "is not a file name in the checkpoint folder; expected "
                                  "shards beside the index")
        found = check_input_file(folder, name, label)
        if found is None:
            raise CheckpointError(f"{label} {folder / name}: shard listed in {INDEX} (for "
                                  f"tensor {tensor!r} and others) is missing; expected the "
                                  "file to exist (incomplete download?)")
        if found[0] in seen:
            raise CheckpointError(f"{label} {index}: shards {seen[found[0]]!r} and {name!r} are "
                                  f"the same file {found[0]}; expected each shard once")
        seen[found[0]] = name
    return [folder / name for name in seen.values()]


def weight_files(folder: Path, label: str) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint folder and, when sharded, the index's weight map.

    `label` names the model in errors ("BASE", "OTHER"). Raises CheckpointError for a
    missing or unreadable folder, pickled weights only, an unreadable index, shards the
    index names that are absent, and weight files that are not regular files inside the
    folder (symlinks out of it, FIFOs, devices, directories)."""
    check_folder(folder, label)
    if check_input_file(folder, SINGLE, label) is not None:  # preferred, as in transformers
        return [folder / SINGLE], None
    raw = read_input(folder, INDEX, label)
    if raw is not None:
        weight_map = _weight_map(raw, folder / INDEX, label)
        return _shards(folder, weight_map, label), weight_map
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
        self.side_files = side_files(self.folder, label)
        try:
            for path in files:
                reader = SafetensorsReader(path, pattern, label=label, folder=self.folder)
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
            if not self.where:
                raise CheckpointError(f"{label} {self.folder}: its weight files hold no "
                                      "tensor; expected a checkpoint with weights")
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
        return read_config(self.folder, self.label)


def side_files(folder: Path, label: str) -> list[str]:
    """The SIDE_FILES present in `folder`, each checked now (a regular file inside the
    folder that can be opened) so that none fails after the merge has run."""
    present = []
    for name in SIDE_FILES:
        fd = open_input(folder, name, label)
        if fd is not None:
            os.close(fd)
            present.append(name)
    return present


def read_config(folder: Path, label: str) -> dict:
    """`folder`/config.json as a dict ({} when absent); CheckpointError naming the model and
    file unless it is a JSON object."""
    path = folder / "config.json"
    raw = read_input(folder, "config.json", label)
    if raw is None:
        return {}
    config = parse_json(raw, f"{label} {path}: unreadable config", "a JSON object")
    if not isinstance(config, dict):
        raise CheckpointError(f"{label} {path}: unreadable config (a JSON "
                              f"{type(config).__name__}); expected a JSON object")
    return config


def check_configs(c1: dict, c2: dict, base: Path, other: Path, vocab: str = "strict") -> None:
    """CheckpointError when the models' config.json differ in a key of ARCH_KEYS;
    vocab_size may differ with vocab="common" (the output keeps BASE's config)."""
    for key in ARCH_KEYS:
        if key in c1 and key in c2 and c1[key] != c2[key]:
            if key == "vocab_size" and vocab == "common":
                continue
            hint = (" (if only the vocabulary's padded rows differ, pass --vocab common / "
                    "vocab=\"common\")" if key == "vocab_size" else "")
            raise CheckpointError(f"config.json: {key} differs: BASE {base} has {c1[key]!r}, "
                                  f"OTHER {other} has {c2[key]!r}; expected the same "
                                  f"architecture and shapes{hint}")
