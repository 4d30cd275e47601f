"""`mix_logits` and `mix_logits_many`: the mixture of K next-token distributions
(DESIGN.md 1.2), validated and dispatched to a backend, with gradients.

    out = log(sum_k w_k * softmax(l_k))      over the last dim, float32 log-probabilities

Both backends implement one engine interface (see modkern/ops/mix_torch.py): a forward that
returns the output plus what the backward needs (the Triton one keeps each row's
logsumexp, never a softmax), and a backward that recomputes the softmaxes from the inputs.
`_MixFunction` wraps an engine for autograd: gradients flow to every logits tensor and to
tensor weights (alpha). With group= (a vocabulary split across processes) the same engines
run in pieces around two small collectives: modkern/ops/mix_parallel.py.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from . import mix_torch
from ..backends import kernel_module, resolve_backend
from ..errors import AlphaError, BackendError, DTypeError, ShapeMismatchError
from ..checks import check_alpha

VOCAB_MODES = ("strict", "common")
MAX_TRITON_K = 4  # the Triton kernels take up to 4 logits tensors
_SUM_TOL = 1e-5   # |sum of weights - 1| allowed (float32 weights round)

Weight = float | torch.Tensor


def mix_logits(l1: torch.Tensor, l2: torch.Tensor, alpha: Weight, *, backend: str = "auto",
               vocab: str = "strict", n_valid: int | None = None, group=None,
               vocab_start: int | None = None, sums_to_one: bool = False) -> torch.Tensor:
    """log(alpha * softmax(l1) + (1 - alpha) * softmax(l2)) over the last dim.

    Args:
        l1, l2: logits [..., V] (bf16, fp16, fp32; fp64 on the torch backend), one leading
            shape, one device.
        alpha: weight of l1 in [0, 1]: a float, or a tensor broadcast over the leading dims
            (one weight per row; gradients flow to it).
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".
        vocab: "strict" raises ShapeMismatchError when the widths differ; "common" keeps
            the first min(V1, V2) columns of both.
        n_valid: treat columns >= n_valid as -inf in both inputs (padded head columns);
            they come out as -inf.
        group: a torch.distributed process group over which the vocabulary is split
            (tensor-parallel decoding): l1 and l2 are this rank's slices, contiguous
            column ranges of the whole vocabulary (any widths, 0 included), and the result
            is this rank's slice of the mixture over the whole vocabulary. Every rank of
            the group must call it (and backpropagate through it) with the same weights
            and leading shape. One all_gather per call, one all_reduce per backward; the
            gradient of a tensor alpha is complete on every rank (see
            modkern/ops/mix_parallel.py). n_valid then counts columns of the whole vocabulary
            and needs vocab_start; vocab="common" needs both models sliced at the same
            column boundaries (each rank keeps its common prefix).
        vocab_start: with group and n_valid, this rank's first column in the whole
            vocabulary (e.g. the head's vocab_start_index).

    Returns float32 log-probabilities [..., V] (float64 for float64 input): softmax of the
    result is the mixture. alpha = 1 gives exactly log_softmax(l1) (0: log_softmax(l2));
    a column at -inf in both inputs gives -inf; a row that log_softmax of a model with
    non-zero weight turns to NaN gives NaN.
    """
    if isinstance(alpha, torch.Tensor):
        _check_weight_tensor(alpha, "alpha")
        weights: list[Weight] = [alpha, 1 - alpha]
    else:
        a = check_alpha(alpha)
        weights = [a, 1.0 - a]
    return _mix([l1, l2], weights, backend, vocab, n_valid, ("l1", "l2"), group, vocab_start,
                sums_to_one=True)  # alpha and 1 - alpha: no sum to check (nor to sync for)


def mix_logits_many(logits: Sequence[torch.Tensor], weights: Sequence[Weight] | torch.Tensor,
                    *, backend: str = "auto", vocab: str = "strict",
                    n_valid: int | None = None, group=None,
                    vocab_start: int | None = None, sums_to_one: bool = False) -> torch.Tensor:
    """K-way mixture: log(sum_k weights[k] * softmax(logits[k])) over the last dim.

    weights: K floats, K tensors broadcast over the leading dims, or one tensor whose last
    dim is K (broadcast over the leading dims); each in [0, 1], summing to 1 (within 1e-5).
    Other arguments (group and vocab_start included) and the result as in `mix_logits`.
    """
    logits = list(logits)
    if isinstance(weights, torch.Tensor):
        _check_weight_tensor(weights, "weights")
        if weights.dim() == 0 or weights.shape[-1] != len(logits):
            raise ShapeMismatchError(f"weights tensor must have a last dim of K = "
                                     f"{len(logits)} (one weight per model), got shape "
                                     f"{list(weights.shape)}")
        weights = list(weights.unbind(-1))
    else:
        weights = list(weights)
        for i, w in enumerate(weights):
            if isinstance(w, torch.Tensor):
                _check_weight_tensor(w, f"weights[{i}]")
            else:
                weights[i] = check_alpha(w, f"weights[{i}]")
    if len(weights) != len(logits):
        raise ShapeMismatchError(f"got {len(logits)} logits tensors but {len(weights)} "
                                 "weights: expected one weight per model")
    names = tuple(f"logits[{i}]" for i in range(len(logits)))
    return _mix(logits, weights, backend, vocab, n_valid, names, group, vocab_start)


# ---------------------------------------------------------------- validation


def _check_weight_tensor(w: torch.Tensor, what: str) -> None:
    if not w.is_floating_point():
        raise AlphaError(f"{what} must be a floating-point tensor, got dtype {w.dtype}")
    if w.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # checking values would synchronize; a captured graph cannot
    bad = torch.isnan(w) | (w < 0) | (w > 1)
    if bool(bad.any()):
        raise AlphaError(f"{what} must lie in [0, 1], got {w[bad].flatten()[0].item()!r} "
                         f"(at index {tuple(i.item() for i in bad.nonzero()[0])})")


def _check_logits(ls: list[torch.Tensor], names: tuple[str, ...], vocab: str,
                  n_valid: int | None, sharded: bool = False,
                  vocab_start: int | None = None) -> tuple[list[torch.Tensor], int | None]:
    """Validate the logits; return them cut to one width, and n_valid (None = all).
    sharded: the logits are one rank's vocabulary slice (group=): the width may be 0 and
    n_valid is global, returned as this slice's count (0 allowed)."""
    if not ls:
        raise ShapeMismatchError("mix needs at least one logits tensor")
    if vocab not in VOCAB_MODES:
        raise ValueError(f"vocab must be one of {VOCAB_MODES}, got {vocab!r}")
    for name, t in zip(names, ls):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} is a {type(t).__name__}, expected a torch.Tensor")
        if not t.is_floating_point():
            raise DTypeError(f"{name} has dtype {t.dtype}, expected floating-point logits")
        if t.dim() == 0:
            raise ShapeMismatchError(f"{name} is a scalar, expected logits of shape [..., V]")
    for name, t in zip(names[1:], ls[1:]):
        if t.shape[:-1] != ls[0].shape[:-1]:
            raise ShapeMismatchError(f"leading shapes differ: {names[0]} has "
                                     f"{list(ls[0].shape)}, {name} has {list(t.shape)}")
        if t.device != ls[0].device:
            raise ShapeMismatchError(f"devices differ: {names[0]} is on {ls[0].device}, "
                                     f"{name} on {t.device}")
    widths = [t.shape[-1] for t in ls]
    if len(set(widths)) > 1:
        if vocab == "strict":
            listed = ", ".join(f"{n} has {w}" for n, w in zip(names, widths))
            raise ShapeMismatchError(f"vocabulary widths differ: {listed} columns; pass "
                                     "vocab='common' to keep the common prefix "
                                     f"(first {min(widths)} tokens)")
        ls = [t[..., :min(widths)] for t in ls]
    V = min(widths)
    if sharded:
        from .mix_parallel import local_n_valid
        return ls, local_n_valid(n_valid, vocab_start, V)
    if vocab_start is not None:
        raise ValueError("vocab_start= is only meaningful with group= (a vocabulary split "
                         "across processes)")
    if V == 0:
        raise ShapeMismatchError("logits have an empty vocabulary (last dim 0)")
    if n_valid is not None:
        if isinstance(n_valid, bool) or not isinstance(n_valid, numbers.Integral) \
                or not 1 <= n_valid <= V:
            raise ShapeMismatchError(f"n_valid must be an int in [1, {V}] (the vocabulary "
                                     f"width), got {n_valid!r}")
        n_valid = None if n_valid == V else int(n_valid)
    return ls, n_valid


def _check_sum(weights: list[float]) -> None:
    total = math.fsum(weights)
    if abs(total - 1.0) > _SUM_TOL:
        raise AlphaError(f"weights must sum to 1, got {list(weights)} (sum {total!r})")


def _weights_matrix(weights: list[Weight], lead: torch.Size, cd: torch.dtype,
                    device: torch.device, sums_to_one: bool = False) -> torch.Tensor:
    """Weights as [rows or 1, K] in cd; autograd flows through tensor weights."""
    if all(not isinstance(w, torch.Tensor) for w in weights):
        return _constant_weights(tuple(weights), cd, device)  # checked by _check_sum
    cols = []
    for i, w in enumerate(weights):
        w = torch.as_tensor(w, dtype=cd, device=device)
        try:
            cols.append(torch.broadcast_to(w, lead).reshape(-1))
        except RuntimeError:
            raise ShapeMismatchError(f"weight {i} of shape {list(w.shape)} does not "
                                     f"broadcast over the leading dims {list(lead)}") from None
    W = torch.stack(cols, dim=1)
    if not sums_to_one and not (W.is_cuda and torch.cuda.is_current_stream_capturing()):
        total = W.detach().sum(1)
        worst = (total - 1).abs().max() if total.numel() else torch.zeros(())
        if bool(worst > _SUM_TOL):
            raise AlphaError(f"weights must sum to 1 in every row; one row sums to "
                             f"{total[(total - 1).abs().argmax()].item()!r}")
    return W


@functools.lru_cache(maxsize=64)
def _constant_weights(weights: tuple[float, ...], cd: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    # Cached: decoding with a fixed alpha makes no host-to-device copy per step (and a
    # CUDA graph captured after a warm-up call reuses this very tensor).
    return torch.tensor([weights], dtype=cd, device=device)


# ---------------------------------------------------------------- dispatch


def _engine(backend: str, ls: list[torch.Tensor]):
    """The engine module for `backend` ("auto" takes Triton for CUDA tensors when the
    kernels can run them: K <= 4 and no float64)."""
    fits = len(ls) <= MAX_TRITON_K and all(t.dtype != torch.float64 for t in ls)
    if backend == "auto" and not fits:
        return mix_torch
    if resolve_backend(backend, *ls) == "torch":
        return mix_torch
    if not fits:
        raise BackendError(f"backend='triton' takes up to {MAX_TRITON_K} logits tensors in "
                           f"bf16, fp16 or fp32, got {len(ls)} of dtypes "
                           f"{[str(t.dtype) for t in ls]}; use backend='torch'")
    return kernel_module("mix_logits")


def _mix(ls: list[torch.Tensor], weights: list[Weight], backend: str, vocab: str,
         n_valid: int | None, names: tuple[str, ...], group=None,
         vocab_start: int | None = None, sums_to_one: bool = False) -> torch.Tensor:
    if group is not None:
        from . import mix_parallel  # torch.distributed: imported only when asked for
        mix_parallel.check_group(group)
    ls, n_valid = _check_logits(ls, names, vocab, n_valid, group is not None, vocab_start)
    engine = _engine(backend, ls)
    lead, V = ls[0].shape[:-1], ls[0].shape[-1]
    cd = mix_torch.compute_dtype(ls)
    if all(not isinstance(w, torch.Tensor) for w in weights):
        _check_sum(weights)  # on the full list, before zero weights are dropped
    keep = [k for k, w in enumerate(weights) if isinstance(w, torch.Tensor) or w > 0]
    ls, weights = [ls[k] for k in keep], [weights[k] for k in keep]  # w = 0: model unused
    W = _weights_matrix(weights, lead, cd, ls[0].device, sums_to_one)
    if group is None and len(ls) == 1 and not isinstance(weights[0], torch.Tensor):
        return _log_softmax(ls[0], cd, n_valid)  # one model, weight 1
    flat = [t.reshape(lead.numel(), V) for t in ls]
    if engine is not mix_torch:
        flat = [t if t.stride(-1) == 1 else t.contiguous() for t in flat]
    if flat[0].shape[0] == 0:  # no rows on any rank (the leading shape is shared)
        return torch.empty(*lead, V, dtype=cd, device=ls[0].device)
    if group is not None:
        out = mix_parallel.ParallelMixFunction.apply(engine, n_valid, group, W, *flat)
    else:
        out = _MixFunction.apply(engine, n_valid, W, *flat)
    return out.view(*lead, V)


def _log_softmax(l: torch.Tensor, cd: torch.dtype, n_valid: int | None) -> torch.Tensor:
    if n_valid is None:
        return torch.log_softmax(l, dim=-1, dtype=cd)
    pad = torch.full((*l.shape[:-1], l.shape[-1] - n_valid), float("-inf"), dtype=cd,
                     device=l.device)
    return torch.cat([torch.log_softmax(l[..., :n_valid], dim=-1, dtype=cd), pad], dim=-1)


class _MixFunction(torch.autograd.Function):
    """out = log(sum_k W[:, k] softmax(l_k)) over [rows, V]; saves no softmax."""

    @staticmethod
    def forward(ctx, engine, n_valid, W, *ls):
        out, saved = engine.forward(ls, W.detach(), n_valid)
        ctx.engine, ctx.n_valid, ctx.has_saved = engine, n_valid, saved is not None
        ctx.save_for_backward(W, *ls, *([saved] if saved is not None else []))
        return out

    @staticmethod
    @once_differentiable  # the fused backward is not itself differentiable
    def backward(ctx, g):
        W, *rest = ctx.saved_tensors
        saved = rest.pop() if ctx.has_saved else None
        grads, gW = ctx.engine.backward(rest, W, saved, g, ctx.n_valid,
                                        need_w=ctx.needs_input_grad[2])
        return (None, None, gW, *grads)
