"""Argument checks of `mix_logits` / `mix_logits_many`: each bad argument raises one
ModkernError subclass naming the argument and what was expected.

Tensor weights are checked in two steps: what can be seen without reading the values
(dtype, layout, device: `check_weight_tensor`) always, and the values themselves (range,
sums) only when the caller asks (`check=True`, the default), since reading them on the host
synchronises with the GPU. While a CUDA graph is being captured they cannot be read at all,
and need not be: a replay runs on whatever values the tensor holds then, unchecked.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ..checks import FLOAT_DTYPES, check_alpha, check_vocab
from ..errors import AlphaError, BackendError, DTypeError, OptionError, ShapeMismatchError

SUM_TOL = 1e-5  # |sum of weights - 1| allowed (float32 weights round)

Weight = float | torch.Tensor


def check_options(vocab: str, check: bool, group, vocab_start) -> None:
    """vocab, check and vocab_start (which needs group=)."""
    check_vocab(vocab, meaning="('strict': widths must be equal; 'common': keep the common "
                "prefix)")
    if not isinstance(check, bool):
        raise OptionError(f"check must be True or False, got {check!r}")
    if vocab_start is not None and group is None:
        raise OptionError("vocab_start= is only meaningful with group= (a vocabulary split "
                          f"across processes), got vocab_start={vocab_start!r} and no group")


def check_logits(ls: list, names: tuple[str, ...]) -> None:
    """Every logits tensor: a dense float tensor of at least one dim, one leading shape
    and one device for all."""
    if not ls:
        raise ShapeMismatchError("mix needs at least one logits tensor")
    for name, t in zip(names, ls):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} is a {type(t).__name__}, expected a torch.Tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{name} has dtype {t.dtype}, expected floating-point logits "
                             f"({', '.join(str(d) for d in FLOAT_DTYPES)})")
        if t.layout != torch.strided:
            raise DTypeError(f"{name} has layout {t.layout}, expected a dense tensor "
                             "(torch.strided): call .to_dense() first")
        if t.device.type == "meta":
            raise BackendError(f"{name} is on the meta device (no data): no backend can "
                               "mix it")
        if t.dim() == 0:
            raise ShapeMismatchError(f"{name} is a scalar, expected logits of shape [..., V]")
    for name, t in zip(names[1:], ls[1:]):
        if t.shape[:-1] != ls[0].shape[:-1]:
            raise ShapeMismatchError(f"leading shapes differ: {names[0]} has "
                                     f"{list(ls[0].shape)}, {name} has {list(t.shape)}")
        if t.device != ls[0].device:
            raise ShapeMismatchError(f"devices differ: {names[0]} is on {ls[0].device}, "
                                     f"{name} on {t.device}")


def common_width(ls: list[torch.Tensor], names: tuple[str, ...], vocab: str) -> list:
    """The logits cut to one vocabulary width (vocab='common'), or ShapeMismatchError."""
    widths = [t.shape[-1] for t in ls]
    if len(set(widths)) == 1:
        return ls
    if vocab == "strict":
        listed = ", ".join(f"{n} has {w}" for n, w in zip(names, widths))
        raise ShapeMismatchError(f"vocabulary widths differ: {listed} columns; pass "
                                 "vocab='common' to keep the common prefix "
                                 f"(first {min(widths)} tokens)")
    return [t[..., :min(widths)] for t in ls]


def check_n_valid(n_valid, V: int) -> int | None:
    """n_valid as an int in [1, V], None when it is V (every column valid)."""
    if V == 0:
        raise ShapeMismatchError("logits have an empty vocabulary (last dim 0)")
    if n_valid is None:
        return None
    if isinstance(n_valid, bool) or not isinstance(n_valid, numbers.Integral) \
            or not 1 <= n_valid <= V:
        raise ShapeMismatchError(f"n_valid must be an int in [1, {V}] (the vocabulary "
                                 f"width), got {n_valid!r}")
    return None if n_valid == V else int(n_valid)


def check_weight_tensor(w, what: str, device: torch.device, check: bool) -> None:
    """A tensor weight: floating point, dense, on the logits' device; with check, its
    values in [0, 1] (this reads them: one host synchronisation on a GPU)."""
    if not w.is_floating_point():
        raise AlphaError(f"{what} must be a floating-point tensor, got dtype {w.dtype}")
    if w.layout != torch.strided:
        raise AlphaError(f"{what} must be a dense tensor, got layout {w.layout}")
    if w.device != device:
        raise AlphaError(f"{what} is on {w.device} but the logits are on {device}: move it "
                         f"there (e.g. {what}.to(logits.device)) or pass a float")
    if not check or _capturing():
        return
    bad = torch.isnan(w) | (w < 0) | (w > 1)
    if bool(bad.any()):
        raise AlphaError(f"{what} must lie in [0, 1], got {w[bad].flatten()[0].item()!r} "
                         f"(at index {tuple(i.item() for i in bad.nonzero()[0])})")


def _capturing() -> bool:
    """True while a CUDA graph is being captured (nothing can be read on the host)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def many_weights(weights, K: int, device: torch.device, check: bool) -> list[Weight]:
    """mix_logits_many's weights as K floats or tensors, each checked."""
    if isinstance(weights, torch.Tensor):
        check_weight_tensor(weights, "weights", device, check)
        if weights.dim() == 0 or weights.shape[-1] != K:
            raise ShapeMismatchError(f"weights tensor must have a last dim of K = {K} (one "
                                     f"weight per model), got shape {list(weights.shape)}")
        return list(weights.unbind(-1))
    if not isinstance(weights, Sequence) or isinstance(weights, str):
        raise AlphaError(f"weights must be a sequence of {K} numbers or tensors, or one "
                         f"tensor whose last dim is {K}, got {type(weights).__name__}")
    out = list(weights)
    for i, w in enumerate(out):
        if isinstance(w, torch.Tensor):
            check_weight_tensor(w, f"weights[{i}]", device, check)
        else:
            out[i] = check_alpha(w, f"weights[{i}]")
    if len(out) != K:
        raise ShapeMismatchError(f"got {K} logits tensors but {len(out)} weights: expected "
                                 "one weight per model")
    return out


def check_float_sum(weights: list[float]) -> None:
    """Float weights must sum to 1 (within SUM_TOL)."""
    total = math.fsum(weights)
    if abs(total - 1.0) > SUM_TOL:
        raise AlphaError(f"weights must sum to 1, got {list(weights)} (sum {total!r})")


def check_row_sums(W: torch.Tensor) -> None:
    """Every row of the weights matrix [rows, K] must sum to 1 (reads the values; not
    while a CUDA graph is captured)."""
    if _capturing():
        return
    total = W.detach().sum(1)
    worst = (total - 1).abs().max() if total.numel() else torch.zeros(())
    if bool(worst > SUM_TOL):
        raise AlphaError(f"weights must sum to 1 in every row; one row sums to "
                         f"{total[(total - 1).abs().argmax()].item()!r}")
