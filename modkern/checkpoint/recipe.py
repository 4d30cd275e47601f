"""The record a merge leaves beside its weights: a recipe file (inputs with content hashes,
alpha rules, filters, precision, modkern version) and a short model card.

The recipe is YAML. Its rule keys (`alpha`, `include`, `exclude`, `precision`, `strict`,
`dtype`) are also what `modkern merge --recipe FILE` reads, so a merge can be rerun from the
recipe of a previous one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from ..errors import CheckpointError
from ..merging.patterns import exact_pattern

RECIPE = "modkern_recipe.yaml"
RULE_KEYS = ("alpha", "include", "exclude", "precision", "strict", "dtype")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_input(ckpt, copied: list[str], full_hash: bool) -> dict[str, Any]:
    """Path and content hashes of one input checkpoint.

    Weight files get their size and the sha256 of their safetensors header (names, dtypes,
    shapes, offsets): hashing every byte would read all of OTHER, which the merge avoids.
    With `full_hash`, the sha256 of each whole file instead. Small files (config,
    tokenizer) always get a full sha256."""
    files: dict[str, Any] = {}
    for reader in ckpt.readers:
        entry: dict[str, Any] = {"bytes": reader.size}
        if full_hash:
            entry["sha256"] = sha256_file(reader.path)
        else:
            entry["header_sha256"] = hashlib.sha256(reader.header_bytes).hexdigest()
        files[reader.path.name] = entry
    for name in copied:
        path = ckpt.folder / name
        if path.is_file():
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
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


def write_recipe(folder: Path, recipe: dict[str, Any]) -> None:
    text = "# modkern merge recipe: rerun with `modkern merge BASE OTHER OUT --recipe THIS_FILE`\n"
    text += yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False)
    (folder / RECIPE).write_text(text, encoding="utf-8")


def read_mapping(path: Path, what: str, expected: str) -> dict:
    """A YAML (or JSON) file that must hold a mapping; CheckpointError naming the file,
    `what` it is and the `expected` keys otherwise."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"{what} {path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise CheckpointError(f"{what} {path}: not YAML/JSON ({err}); expected a mapping "
                              f"with {expected}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path}: expected a mapping with {expected}; got "
                              f"{type(data).__name__}")
    return data


def load_rules(path: str | Path) -> dict[str, Any]:
    """The rule keys of a recipe file (YAML or JSON): alpha (float or pattern mapping),
    include, exclude, precision, strict, dtype. Other keys are ignored."""
    path = Path(path)
    data = read_mapping(path, "recipe", "keys such as alpha, include, exclude")
    rules = {k: data[k] for k in RULE_KEYS if k in data}
    alpha = rules.get("alpha")
    if isinstance(alpha, bool) or (alpha is not None and
                                   not isinstance(alpha, (int, float, dict))):
        raise CheckpointError(f"recipe {path}: alpha must be a number or a mapping of name "
                              f"pattern -> number, got {alpha!r}")
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
