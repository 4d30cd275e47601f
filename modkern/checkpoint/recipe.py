"""The record a merge leaves beside its weights: a recipe file (inputs with content hashes,
alpha rules, filters, precision, modkern version) and a short model card.

The recipe is YAML. Its rule keys (`alpha`, `include`, `exclude`, `precision`, `strict`,
`dtype`, `vocab`) are also what `modkern merge --recipe FILE` reads, so a merge can be
rerun from the recipe of a previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from ..checks import VOCAB_MODES
from ..errors import CheckpointError
from ..merging.patterns import exact_pattern
from .input_files import open_input
from .publish import output_error

RECIPE = "modkern_recipe.yaml"
RULE_KEYS = ("alpha", "include", "exclude", "precision", "strict", "dtype", "vocab")
# Recipe and config files are a few KB; a bigger file is not one (or is /dev/zero).
MAX_TEXT = 10 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_fd(fd: int, where: str) -> str:
    """sha256 of an open file, read with positioned reads from its start."""
    h, pos = hashlib.sha256(), 0
    try:
        while block := os.pread(fd, 1 << 20, pos):
            h.update(block)
            pos += len(block)
    except OSError as err:
        raise CheckpointError(f"{where}: cannot read: {err.strerror}") from None
    return h.hexdigest()


def describe_input(ckpt, copied: list[str], full_hash: bool) -> dict[str, Any]:
    """Path and content hashes of one input checkpoint.

    Weight files get their size and the sha256 of their safetensors header (names, dtypes,
    shapes, offsets): hashing every byte would read all of OTHER, which the merge avoids.
    With `full_hash`, the sha256 of each whole file instead. Small files (config,
    tokenizer) always get a full sha256; they are read under the input-file rule
    (input_files), like everything else of an input."""
    files: dict[str, Any] = {}
    for reader in ckpt.readers:
        entry: dict[str, Any] = {"bytes": reader.size}
        if full_hash:
            entry["sha256"] = sha256_fd(reader.fd, reader.where)
        else:
            entry["header_sha256"] = hashlib.sha256(reader.header_bytes).hexdigest()
        files[reader.path.name] = entry
    for name in copied:
        fd = open_input(ckpt.folder, name, ckpt.label)
        if fd is None:
            continue
        try:
            files[name] = {"bytes": os.fstat(fd).st_size,
                           "sha256": sha256_fd(fd, f"{ckpt.label} {ckpt.folder / name}")}
        finally:
            os.close(fd)
    return {"path": str(ckpt.folder), "files": files}


def alpha_record(alpha, plan: dict[str, float]) -> Any:
    """alpha as the recipe writes it: the float or mapping itself; a function is recorded as
    its value per merged tensor, under an exact-name pattern (what it left unmerged is
    recorded by the caller as excluded)."""
    if isinstance(alpha, (int, float)):
        return float(alpha)
    if isinstance(alpha, dict) or hasattr(alpha, "items"):
        return {str(k): float(v) for k, v in alpha.items()}
    return {exact_pattern(n): a for n, a in plan.items()}


MERGE_HEADER = "modkern merge recipe: rerun with `modkern merge BASE OTHER OUT --recipe THIS_FILE`"


def write_recipe(folder: Path, recipe: dict[str, Any], header: str = MERGE_HEADER) -> None:
    """`recipe` as YAML in folder/modkern_recipe.yaml, under the comment line `header`."""
    text = f"# {header}\n"
    text += yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)
    try:
        (folder / RECIPE).write_text(text, encoding="utf-8")
    except OSError as err:
        raise output_error(folder / RECIPE, err, "write") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong, and where (PyYAML prints several lines)."""
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    text = problem or str(err)
    if mark is not None:
        text += f" at line {mark.line + 1} column {mark.column + 1}"
    return " ".join(text.split())


def read_text_file(path: Path, what: str, limit: int = MAX_TEXT) -> str:
    """A small text file given by the user (a pipe such as `<(...)` works too); at most
    `limit` bytes of UTF-8, else CheckpointError naming `what` and the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as err:
        raise CheckpointError(f"{what} {path}: cannot read: {err.strerror}") from None
    if len(raw) > limit:
        raise CheckpointError(f"{what} {path}: larger than {limit} bytes; expected a small "
                              "YAML/JSON file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{what} {path}: not UTF-8 text (byte {err.start}); expected a "
                              "YAML/JSON file") from None


def read_mapping(path: Path, what: str, expected: str) -> dict:
    """A YAML (or JSON) file that must hold a mapping; CheckpointError naming the file,
    `what` it is and the `expected` keys otherwise."""
    text = read_text_file(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        why = _yaml_problem(err)
    except RecursionError:
        why = "nested too deeply"
    except ValueError as err:  # a value YAML accepts but Python cannot build (huge int, date)
        why = " ".join(str(err).split(";")[0].split())
    else:
        if not isinstance(data, dict):
            raise CheckpointError(f"{what} {path}: expected a mapping with {expected}; got "
                                  f"{type(data).__name__}")
        return data
    raise CheckpointError(f"{what} {path}: not YAML/JSON ({why}); expected a mapping with "
                          f"{expected}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_patterns(x) -> bool:
    return isinstance(x, str) or (isinstance(x, list) and all(isinstance(p, str) for p in x))


# What each rule key of a recipe may hold: a check and the words for the error.
_RULE_TYPES = {
    "alpha": (lambda a: _is_number(a) or (isinstance(a, dict) and all(
        isinstance(k, str) and _is_number(v) for k, v in a.items())),
        "a number or a mapping of name pattern -> number"),
    "include": (_is_patterns, "a name pattern or a list of name patterns"),
    "exclude": (_is_patterns, "a name pattern or a list of name patterns"),
    "precision": (lambda p: isinstance(p, str), "'exact' or 'reference'"),
    "strict": (lambda b: isinstance(b, bool), "true or false"),
    "dtype": (lambda d: isinstance(d, str), "a dtype name such as bfloat16"),
    "vocab": (lambda v: v in VOCAB_MODES, "'strict' or 'common'"),
}


def load_rules(path: str | Path) -> dict[str, Any]:
    """The rule keys of a recipe file (YAML or JSON): alpha (float or pattern mapping),
    include, exclude, precision, strict, dtype, vocab. Other keys are ignored; a rule key of the
    wrong type is a CheckpointError naming it and what it may hold (null means unset)."""
    path = Path(path)
    data = read_mapping(path, "recipe", "keys such as alpha, include, exclude")
    rules = {k: data[k] for k in RULE_KEYS if data.get(k) is not None}
    for key, value in rules.items():
        ok, expected = _RULE_TYPES[key]
        if not ok(value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
            raise CheckpointError(f"recipe {path}: {key} must be {expected}, got {shown}")
    return rules


def model_card(base: Path, other: Path, recipe: dict[str, Any]) -> str:
    """A short README.md for the output folder."""
    rules = {k: recipe[k] for k in ("alpha", "include", "exclude", "precision", "dtype")
             if recipe.get(k) is not None}
    res = recipe["result"]
    front = yaml.safe_dump({"library_name": "transformers",
                            "tags": ["merge", "modkern", "mixture-of-distributions"]},
                           sort_keys=False)
    return (
        f"---\n{front}---\n\n"
        f"# MoD merge of {base.name} and {other.name}\n\n"
        "This model was made with modkern by Mixture of Distributions weight select "
        "([MoD, arXiv 2411.00406](https://arxiv.org/abs/2411.00406)): every weight of the "
        "base model is kept unless its "
        "min-max normalized value reaches alpha, where the other model's weight is taken.\n\n"
        f"- base (model 1): `{base}`\n- other (model 2): `{other}`\n"
        f"- rules: `{json.dumps(rules)}`\n"
        f"- tensors merged: {res['tensors_merged']}, carried over: {res['tensors_copied']}; "
        f"elements taken from the other model: {res['elements_taken']} of "
        f"{res['elements_merged']}\n"
        f"- modkern {__version__}\n\n"
        f"The full recipe, with content hashes of the inputs, is in `{RECIPE}`.\n"
    )
