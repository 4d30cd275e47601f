"""Planning a merge of two models before any work: which tensors are merged (present in
both, selected by the name filters, floating point), each pair checked (dtype, shape,
device), and the alpha of each. The models may be state dicts of real tensors or of meta
tensors (a checkpoint's headers): no tensor data is read."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import AlphaError, DTypeError, KeyMismatchError
from ..ops.select_context import MODELS, SelectContext
from .patterns import AlphaRule, alpha_for

ContextOf = Callable[[str], SelectContext]  # names a tensor (and its files) in errors


def check_keys(sd1: Mapping[str, object], sd2: Mapping[str, object]) -> None:
    """KeyMismatchError naming the keys that only one model has."""
    only1 = [k for k in sd1 if k not in sd2]
    only2 = [k for k in sd2 if k not in sd1]
    if only1 or only2:
        def show(keys: list[str]) -> str:
            return ", ".join(repr(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
        parts = []
        if only1:
            parts.append(f"{len(only1)} key(s) only in model 1 (base): {show(only1)}")
        if only2:
            parts.append(f"{len(only2)} key(s) only in model 2 (other): {show(only2)}")
        raise KeyMismatchError("state dicts differ: " + "; ".join(parts) +
                               " (pass strict=False to carry model 1's extra keys over and "
                               "ignore model 2's)")


def check_state_dicts(sd1: object, sd2: object) -> None:
    """DTypeError unless both models are mappings of str names (state dicts), naming the
    model and what it is (e.g. a module passed instead of its state_dict())."""
    for label, sd in zip(MODELS, (sd1, sd2)):
        if not isinstance(sd, Mapping):
            hint = " (pass model.state_dict())" if isinstance(sd, torch.nn.Module) else ""
            raise DTypeError(f"{label} is a {type(sd).__name__}; expected a mapping of tensor "
                             f"name -> tensor (a state dict){hint}")
        for name in sd:
            if not isinstance(name, str):
                raise DTypeError(f"{label} has the key {name!r} ({type(name).__name__}); "
                                 "expected str tensor names (a state dict)")


def is_weight(t: object) -> bool:
    """Whether a merge selects `t`: a floating-point tensor, or a quantized one (refused by
    the pair check: it must be dequantized first, not silently carried over)."""
    return isinstance(t, torch.Tensor) and (t.is_quantized or t.is_floating_point())


def names_to_merge(sd1: Mapping[str, torch.Tensor], sd2: Mapping[str, torch.Tensor],
                   keep: Callable[[str], bool], context_of: ContextOf = SelectContext, *,
                   need_data: bool = True, vocab: str = "strict") -> list[str]:
    """The names of sd1 (in its order) whose tensors are merged: in sd2 too, kept by the
    name filter `keep`, floating point; every such pair checked (and a pair of one
    floating-point tensor and one other refused). `need_data` and `vocab` as for
    SelectContext.check_pair (need_data False: meta tensors standing for headers)."""
    names = []
    for name, t1 in sd1.items():
        if name not in sd2 or not keep(name):
            continue
        t2 = sd2[name]
        if not is_weight(t1):
            if isinstance(t1, torch.Tensor) and is_weight(t2):
                raise context_of(name).floating_mismatch(t1, t2)
            continue
        context_of(name).check_pair(t1, t2, need_data=need_data, vocab=vocab)
        names.append(name)
    return names


def common_rows(t1: torch.Tensor, t2: torch.Tensor) -> int | None:
    """For a pair whose first dimension differs (vocab="common"): the number of leading
    rows both have, which the merge selects (model 1's further rows are kept as they are);
    None when the shapes are equal (the whole tensor is merged)."""
    if t1.shape == t2.shape:
        return None
    return min(t1.shape[0], t2.shape[0])


def alphas(rule: AlphaRule, names: list[str], context_of: ContextOf = SelectContext
           ) -> dict[str, float]:
    """The alpha of each name by `rule` (checked by patterns.check_alpha_rule), leaving out
    the names a function rule gives None."""
    plan: dict[str, float] = {}
    for name in names:
        try:
            a = alpha_for(rule, name)
        except AlphaError as err:
            raise AlphaError(context_of(name).in_files(str(err))) from None
        if a is not None:
            plan[name] = a
    return plan
