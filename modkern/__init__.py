"""modkern: Mixture of Distributions (MoD, arXiv 2411.00406) merging with fused Triton kernels.

    import modkern
    merged = modkern.merge_state_dicts(sd1, sd2, alpha=0.9)   # weight select per tensor
    logp = modkern.mix_logits(l1, l2, alpha=0.5)             # mixture of two distributions

`import modkern` needs neither a GPU nor triton: the Triton kernels (`modkern.kernels`) are
imported only when a Triton backend runs. Public names are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (AlphaError, BackendError, CheckpointError, DataError, DTypeError,
                     KeyMismatchError, ModkernError, NonFiniteError, OptionError,
                     ShapeMismatchError)

# public name -> module that defines it
_LAZY = {
    "mod_select": "ops.select",
    "mod_select_": "ops.select",
    "mod_select_reference": "ops.select_reference",
    "select_threshold": "ops.select_reference",
    "mix_logits": "ops.mix",
    "mix_logits_many": "ops.mix",
    "mix_logits_reference": "ops.mix_reference",
    "mix_logits_many_reference": "ops.mix_reference",
    "mixture_kd_loss": "ops.mixture_kd",
    "fused_linear_mixture_kd": "ops.mixture_kd",
    "mixture_kd_reference": "ops.kd_reference",
    "merge_state_dicts": "merging.state_dict",
    "MergeStats": "merging.counts",
    "sweep_merges": "merging.sweep",
    "sweep": "evaluation.sweep",
    "sweep_mixture": "evaluation.sweep",
    "SweepResult": "evaluation.result",
    "EvalSet": "evaluation.scoring",
    "loglik_scorer": "evaluation.scoring",
    "exact_match_scorer": "evaluation.scoring",
    "read_prompt_answers": "evaluation.data",
    "merge_checkpoints": "checkpoint.merge",
    "MergeReport": "checkpoint.report",
    "merge_checkpoints_distributed": "checkpoint.distributed",
    "MixtureOfDistributions": "decoding.generation",
    "generate": "decoding.generation",
}

if TYPE_CHECKING:
    from .checkpoint.distributed import merge_checkpoints_distributed
    from .checkpoint.merge import merge_checkpoints
    from .checkpoint.report import MergeReport
    from .decoding.generation import MixtureOfDistributions, generate
    from .merging.counts import MergeStats
    from .merging.state_dict import merge_state_dicts
    from .merging.sweep import sweep_merges
    from .evaluation.data import read_prompt_answers
    from .evaluation.result import SweepResult
    from .evaluation.scoring import EvalSet, exact_match_scorer, loglik_scorer
    from .evaluation.sweep import sweep, sweep_mixture
    from .ops.mix import mix_logits, mix_logits_many
    from .ops.kd_reference import mixture_kd_reference
    from .ops.mix_reference import mix_logits_many_reference, mix_logits_reference
    from .ops.mixture_kd import fused_linear_mixture_kd, mixture_kd_loss
    from .ops.select import mod_select, mod_select_
    from .ops.select_reference import mod_select_reference, select_threshold


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modkern' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", *_LAZY, "ModkernError", "AlphaError", "BackendError",
           "CheckpointError", "DataError", "DTypeError", "KeyMismatchError", "NonFiniteError",
           "OptionError", "ShapeMismatchError"]
