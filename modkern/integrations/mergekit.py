"""MoD as a mergekit merge method: `merge_method: mod` in a mergekit YAML.

mergekit 0.1.5 finds merge methods only in its own registry (it has no plugin or
entry-point discovery), so the method must be registered in the process that runs the
merge. Two ways:

    modkern-mergekit-yaml merge.yml OUT [mergekit-yaml options]   # registers, then runs
    python -m modkern.integrations.mergekit merge.yml OUT [...]   # the same

or, from Python, `modkern.integrations.mergekit.register()` before `mergekit.merge.run_merge`.

A config (model 1 is `base_model`, model 2 the one other model):

    merge_method: mod
    base_model: ./model-a
    models:
      - model: ./model-b
    parameters:
      alpha: [0.8, 0.9]       # a float, or a gradient interpolated over the layers
      precision: exact        # or "reference" (the released code's arithmetic)

Every output tensor is `modkern.mod_select(base, other, alpha, ...)` for the alpha that
mergekit resolves for it (filters, gradients), so the result equals
`modkern.merge_state_dicts(sd1, sd2, alpha_rule)` bit for bit. The tensors reach the
method in their stored dtype unless the config sets `dtype:`; precision "exact" gives the
same result either way, "reference" computes in the dtype the method receives (leave
`dtype:` unset to reproduce the released code on bf16/fp16 checkpoints).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

import torch

try:
    from mergekit.merge_methods import (BasePolicy, InputContract, MergeMethod,
                                        OptionalTensorPolicy, TensorGroup, merge_method,
                                        registered_methods)
    from mergekit.merge_methods import register as _register_in_mergekit
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    if error.name != "mergekit" and not str(error.name).startswith("mergekit."):
        raise
    raise ModuleNotFoundError(
        "modkern.integrations.mergekit needs mergekit: pip install \"modkern[mergekit]\"",
        name="mergekit") from error

from ..errors import ModkernError
from ..ops.select import mod_select

METHOD_NAME = "mod"
PROG = "modkern-mergekit-yaml"


def mod_merge(group: TensorGroup, alpha: float,
              precision: Literal["exact", "reference"] = "exact",
              backend: Literal["auto", "torch", "triton"] = "auto",
              keep_base: bool = False) -> torch.Tensor:
    """One output tensor: MoD select of the base model's tensor (model 1) and the other
    model's (model 2). `keep_base: true` (e.g. with a filter) carries the base tensor over
    unmerged, as `exclude` does in `modkern merge`."""
    name = group.metadata.name
    base, other = group.base.tensor, group.non_base[0].tensor
    if keep_base:
        return base
    return mod_select(base, other, alpha, backend=backend, precision=precision, name=name)


MOD_METHOD: MergeMethod = merge_method(
    mod_merge,
    name=METHOD_NAME,
    pretty_name="MoD (Mixture of Distributions, modkern)",
    reference_url="https://arxiv.org/abs/2411.00406",
    contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2),
    # a weight only the base has (say an untied lm_head) is carried over, as with
    # merge_state_dicts(strict=False)
    optional_tensor_policy=OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
)


def register() -> MergeMethod:
    """Add `mod` to mergekit's merge methods (idempotent) and return the method.

    Raises RuntimeError if a different method already holds the name "mod"."""
    for method in registered_methods():
        if method.spec.name == METHOD_NAME:
            if method is MOD_METHOD or method.spec == MOD_METHOD.spec:
                return method
            raise RuntimeError(f"mergekit already has a merge method named {METHOD_NAME!r} "
                               f"({method!r}) that is not modkern's; cannot register MoD")
    _register_in_mergekit(MOD_METHOD)
    return MOD_METHOD


def main(argv: Sequence[str] | None = None) -> int:
    """`mergekit-yaml` with `merge_method: mod` available: same arguments and options.
    A modkern error (bad alpha, a non-finite weight, ...) becomes one line and exit code 2,
    as in the `modkern` command. Returns the exit code."""
    from mergekit.scripts.run_yaml import main as run_yaml

    register()
    try:
        run_yaml.main(args=list(sys.argv[1:] if argv is None else argv), prog_name=PROG)
    except ModkernError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as done:  # click ends every run with sys.exit: return its code
        code = done.code
        return code if isinstance(code, int) else int(code is not None)
    return 0


if __name__ == "__main__":
    # run the imported module's main, so the method registered is the package's object
    from modkern.integrations.mergekit import main as _main

    sys.exit(_main())
