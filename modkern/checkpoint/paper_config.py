"""The merge config format of the paper's released code, so its merges can be rebuilt:

    base_model: path/to/model1
    experts:
      - source_model: path/to/model1     # model 1: kept where its normalized weight < alpha
      - source_model: path/to/model2     # model 2
    weights: [0.9, 0.1]                  # alpha = weights[0]; two entries summing to 1
    model_kwargs: {...}                  # how the released code loaded models: ignored

The released code merged experts[0] (the base) with experts[1] and took config and
tokenizer from experts[0]; `base_model` was not used by the merge. Paths must be local
folders (relative paths are taken from the current directory). To reproduce the released
code's result exactly, merge with `precision="reference"` and `include="mlp"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import AlphaError, CheckpointError
from .recipe import read_mapping
from ..checks import check_alpha


@dataclass(frozen=True)
class PaperConfig:
    base: Path   # model 1: experts[0].source_model
    other: Path  # model 2: experts[1].source_model
    alpha: float  # weights[0]
    raw: dict     # the file's content, for the recipe


def _local(path: str, cfg: Path, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"config {cfg}: {key} {path!r} is not a local folder; expected "
                              "a checkpoint folder on disk (download a hub model first, e.g. "
                              "`huggingface-cli download ID --local-dir DIR`, and give DIR)")
    return p


def load_paper_config(path: str | Path) -> PaperConfig:
    """Read a released-code config file; CheckpointError/AlphaError name what is wrong."""
    path = Path(path)
    data = read_mapping(path, "config", "keys base_model, experts, weights")
    experts, weights = data.get("experts"), data.get("weights")
    if not isinstance(experts, list) or len(experts) != 2 or not all(
            isinstance(e, dict) and isinstance(e.get("source_model"), str) for e in experts):
        raise CheckpointError(f"config {path}: experts must be a list of two entries with a "
                              f"source_model each (MoD merges two models), got {experts!r}")
    if not isinstance(weights, list) or len(weights) != 2:
        raise AlphaError(f"config {path}: weights must be a list of two numbers, got "
                         f"{weights!r}")
    w = [check_alpha(x, f"config {path}: weights entry") for x in weights]
    if not math.isclose(sum(w), 1.0, rel_tol=1e-5):
        raise AlphaError(f"config {path}: weights must sum to 1, got {weights!r} "
                         f"(sum {sum(w)})")
    base = _local(experts[0]["source_model"], path, "experts[0].source_model")
    other = _local(experts[1]["source_model"], path, "experts[1].source_model")
    return PaperConfig(base=base, other=other, alpha=w[0], raw=data)
