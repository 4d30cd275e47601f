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
from .errors import (AlphaError, BackendError, CheckpointError, DTypeError, KeyMismatchError,
                     ModkernError, NonFiniteError, OptionError, ShapeMismatchError)

# public name -> module that defines it
_LAZY = {
    "mod_select": "select",
    "mod_select_": "select",
    "merge_state_dicts": "merge",
    "MergeStats": "merge",
    "mod_select_reference": "select_reference",
    "select_threshold": "select_reference",
    "mix_logits_reference": "mix_reference",
    "mix_logits_many_reference": "mix_reference",
    "mix_logits": "mix",
    "mix_logits_many": "mix",
    "MixtureOfDistributions": "generation",
    "generate": "generation",
    "merge_checkpoints": "checkpoint",
    "MergeReport": "checkpoint",
    "merge_checkpoints_distributed": "distributed_merge",
}

if TYPE_CHECKING:
    from .checkpoint import MergeReport, merge_checkpoints
    from .distributed_merge import merge_checkpoints_distributed
    from .generation import MixtureOfDistributions, generate
    from .merge import MergeStats, merge_state_dicts
    from .mix import mix_logits, mix_logits_many
    from .mix_reference import mix_logits_many_reference, mix_logits_reference
    from .select import mod_select, mod_select_
    from .select_reference import mod_select_reference, select_threshold


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modkern' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", *_LAZY, "ModkernError", "AlphaError", "BackendError",
           "CheckpointError", "DTypeError", "KeyMismatchError", "NonFiniteError",
           "OptionError", "ShapeMismatchError"]
