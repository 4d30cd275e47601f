"""The inputs of the mixture-of-teachers distillation loss, checked and read chunk by chunk.

A student or teacher is a `LogitsSource`: logits given as a tensor [..., V], or computed
as hidden [..., H] @ weight[V, H].T (+ bias [V]) for just the rows of one chunk, so that a
fused loss never holds anyone's full [N, V] logits. Every check names the argument that is
wrong and what was expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..checks import check_alpha, check_vocab
from ..errors import AlphaError, DTypeError, OptionError, ShapeMismatchError
from .kd_reference import KINDS

SUM_TOL = 1e-5  # |sum of weights - 1| allowed (weights written to a few digits round)

Rows = slice | torch.Tensor  # a range of rows, or the indices of the rows to take


def _check_float(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{what} is a {type(t).__name__}, expected a torch.Tensor")
    if not t.is_floating_point():
        raise DTypeError(f"{what} has dtype {t.dtype}, expected a floating-point tensor")
    return t


@dataclass
class LogitsSource:
    """Logits of N rows: `logits` [N, V], or hidden [N, H] @ weight.T (+ bias)."""

    name: str
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.logits.shape[-1] if self.logits is not None else self.weight.shape[0]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.logits, self.hidden, self.weight, self.bias) if t is not None]

    @property
    def dtype(self) -> torch.dtype:
        return (self.logits if self.logits is not None else self.hidden).dtype

    def rows(self, sel: Rows, V: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of rows `sel`, first V columns: a view where it can be (given logits,
        a range of rows), else a fresh tensor (written into `out` when given)."""
        if self.logits is not None:
            chunk = self.logits[sel, :V]
            return chunk if out is None else out.copy_(chunk)
        h = self.hidden[sel]
        w = self.weight[:V]
        if out is not None and out.dtype == h.dtype:
            if self.bias is None:
                return torch.matmul(h, w.T, out=out)
            return torch.addmm(self.bias[:V], h, w.T, out=out)
        chunk = h @ w.T if self.bias is None else torch.addmm(self.bias[:V], h, w.T)
        return chunk if out is None else out.copy_(chunk)


def logits_source(name: str, logits: torch.Tensor, lead: torch.Size | None) -> LogitsSource:
    """A source of given logits [..., V] flattened to [N, V]; `lead`: the leading shape
    they must have (None: any, they set it)."""
    _check_float(logits, name)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ShapeMismatchError(f"{name} has shape {list(logits.shape)}, expected logits "
                                 "[..., V] with V >= 1")
    if lead is not None and logits.shape[:-1] != lead:
        raise ShapeMismatchError(f"{name} has shape {list(logits.shape)}, expected leading "
                                 f"dims {list(lead)} (one row per student row)")
    return LogitsSource(name, logits=logits.reshape(-1, logits.shape[-1]))


def linear_source(name: str, hidden, weight, bias, lead: torch.Size | None) -> LogitsSource:
    """A source computed as hidden [..., H] @ weight[V, H].T (+ bias [V]), rows flattened."""
    _check_float(hidden, f"{name}: hidden")
    _check_float(weight, f"{name}: weight")
    if hidden.dim() < 1:
        raise ShapeMismatchError(f"{name}: hidden is a scalar, expected [..., H]")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ShapeMismatchError(f"{name}: weight has shape {list(weight.shape)}, expected "
                                 f"[V, H] with H = {H} (hidden's last dim) and V >= 1")
    if bias is not None:
        _check_float(bias, f"{name}: bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ShapeMismatchError(f"{name}: bias has shape {list(bias.shape)}, expected "
                                     f"[{weight.shape[0]}] (weight's V)")
    if lead is not None and hidden.shape[:-1] != lead:
        raise ShapeMismatchError(f"{name}: hidden has shape {list(hidden.shape)}, expected "
                                 f"leading dims {list(lead)} (one row per student row)")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise DTypeError(f"{name}: {what} has dtype {t.dtype} but hidden has "
                             f"{hidden.dtype}; expected one dtype for the matmul")
    return LogitsSource(name, hidden=hidden.reshape(-1, H), weight=weight, bias=bias)


def teacher_sources(teachers, lead: torch.Size) -> list[LogitsSource]:
    """Each teacher: logits [..., V_k], or a (hidden, weight) or (hidden, weight, bias)
    tuple whose logits are computed chunk by chunk."""
    if isinstance(teachers, torch.Tensor) or not isinstance(teachers, Sequence) \
            or len(teachers) == 0:
        raise ShapeMismatchError("teacher_logits must be a list of K >= 1 teachers, each "
                                 "logits [..., V] or a (hidden, weight[, bias]) tuple, got "
                                 f"{type(teachers).__name__}")
    out = []
    for k, t in enumerate(teachers):
        name = f"teacher_logits[{k}]"
        if isinstance(t, (tuple, list)):
            if len(t) not in (2, 3):
                raise ShapeMismatchError(f"{name} is a tuple of {len(t)}, expected (hidden, "
                                         "weight) or (hidden, weight, bias)")
            out.append(linear_source(name, t[0], t[1], t[2] if len(t) == 3 else None, lead))
        else:
            out.append(logits_source(name, t, lead))
    return out


def check_devices(sources: Sequence[LogitsSource], extra: Sequence[torch.Tensor] = ()) -> None:
    device = sources[0].tensors[0].device
    for src in sources:
        for t in src.tensors:
            if t.device != device:
                raise ShapeMismatchError(f"{src.name} is on {t.device}, expected {device} "
                                         f"(where {sources[0].name} is)")
    for t in extra:
        if t.device != device:
            raise ShapeMismatchError(f"mask is on {t.device}, expected {device}")


def common_width(sources: Sequence[LogitsSource], vocab: str) -> int:
    """The vocabulary the loss runs over: min of the widths (vocab="common"); with
    vocab="strict" differing widths raise ShapeMismatchError naming each."""
    check_vocab(vocab)
    widths = [s.width for s in sources]
    if vocab == "strict" and len(set(widths)) > 1:
        listed = ", ".join(f"{s.name} has {w}" for s, w in zip(sources, widths))
        raise ShapeMismatchError(f"vocabulary widths differ: {listed} columns; pass "
                                 f"vocab='common' to keep the first {min(widths)}")
    return min(widths)


def check_weights(weights, K: int) -> tuple[float, ...]:
    """K weights as floats, each in [0, 1], summing to 1 (within 1e-5); AlphaError else."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise AlphaError(f"weights tensor must be 1-D (one weight per teacher), got "
                             f"shape {list(weights.shape)}")
        weights = weights.detach().cpu().tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise AlphaError(f"weights must be a sequence of K = {K} numbers, got {weights!r}")
    if len(weights) != K:
        raise ShapeMismatchError(f"got {K} teachers but {len(weights)} weights: expected one "
                                 "weight per teacher")
    ws = tuple(check_alpha(w, f"weights[{i}]") for i, w in enumerate(weights))
    total = math.fsum(ws)
    if abs(total - 1.0) > SUM_TOL:
        raise AlphaError(f"weights must sum to 1, got {list(ws)} (sum {total!r})")
    return ws


def check_options(temperature, kind: str, chunk_rows) -> float:
    """temperature as a float; OptionError for a bad temperature, kind or chunk_rows."""
    if kind not in KINDS:
        raise OptionError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise OptionError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or
                                   not isinstance(chunk_rows, numbers.Integral)
                                   or chunk_rows < 1):
        raise OptionError(f"chunk_rows must be a whole number >= 1 or None, got {chunk_rows!r}")
    return float(temperature)


def kept_rows(mask, lead: torch.Size, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows that count, or None for all. mask: bool of the leading shape
    (True counts), or integer labels (rows whose label is ignore_index do not count)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise DTypeError(f"mask is a {type(mask).__name__}, expected a bool or integer tensor")
    if mask.shape != lead:
        raise ShapeMismatchError(f"mask has shape {list(mask.shape)}, expected {list(lead)} "
                                 "(the logits' leading dims)")
    if mask.dtype == torch.bool:
        keep = mask
    elif not mask.is_floating_point() and not mask.is_complex():
        keep = mask != ignore_index
    else:
        raise DTypeError(f"mask has dtype {mask.dtype}, expected bool (True = the row "
                         f"counts) or integer labels ({ignore_index} = ignored)")
    return keep.reshape(-1).nonzero().view(-1)
