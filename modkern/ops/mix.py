"""`mix_logits` and `mix_logits_many`: the mixture of K next-token distributions
(docs/design.md 1.2), validated and dispatched to a backend, with gradients.

    out = log(sum_k w_k * softmax(l_k))      over the last dim, float32 log-probabilities

Both backends implement one engine interface (see modkern/ops/mix_torch.py): a forward that
returns the output plus what the backward needs (the Triton one keeps each row's
statistics, never a softmax), and a backward that recomputes the softmaxes from the inputs.
`_MixFunction` wraps an engine for autograd: gradients flow to every logits tensor and to
tensor weights (alpha); when nothing needs a gradient the engine's forward runs alone.
With group= (a vocabulary split across processes) the same engines run in pieces around
two small collectives: modkern/ops/mix_parallel.py. Argument checks: mix_checks.py.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import mix_checks, mix_torch
from ..backends import engine_module
from ..checks import check_alpha
from ..errors import DTypeError, ShapeMismatchError
from .mix_checks import Weight

MAX_TRITON_K = 4  # models per Triton launch: each adds registers and unrolled code


def mix_logits(l1: torch.Tensor, l2: torch.Tensor, alpha: Weight, *, backend: str = "auto",
               vocab: str = "strict", n_valid: int | None = None, group=None,
               vocab_start: int | None = None, check: bool = True) -> torch.Tensor:
    """log(alpha * softmax(l1) + (1 - alpha) * softmax(l2)) over the last dim.

    Args:
        l1, l2: logits [..., V] (bf16, fp16, fp32; fp64 on the torch backend), one leading
            shape, one device.
        alpha: weight of l1 in [0, 1]: a float, or a tensor on the logits' device broadcast
            over the leading dims (one weight per row; gradients flow to it).
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
        check: check the values of a tensor alpha (in [0, 1]). Reading them costs one
            host synchronisation per call on a GPU. check=False skips that read, and
            nothing else: the call then never synchronises (Triton backend); the caller
            vouches for the values (outside [0, 1] they give NaN or wrong results).
            While a CUDA graph is being captured the values are not read either way (a
            replay uses the values of its moment, unchecked), so a decoding step with a
            tensor alpha can be captured.

    Returns float32 log-probabilities [..., V] (float64 for float64 input): softmax of the
    result is the mixture. alpha = 1 gives exactly log_softmax(l1) (0: log_softmax(l2));
    a column at -inf in both inputs gives -inf; a row that log_softmax of a model with
    non-zero weight turns to NaN gives NaN.

    Raises a ModkernError subclass for bad input: AlphaError (alpha), OptionError (vocab,
    check, vocab_start, group), ShapeMismatchError, DTypeError, BackendError.
    """
    mix_checks.check_options(vocab, check, group, vocab_start)
    mix_checks.check_logits([l1, l2], ("l1", "l2"))
    if isinstance(alpha, torch.Tensor):
        mix_checks.check_weight_tensor(alpha, "alpha", l1.device, check)
        weights: list[Weight] = [alpha, 1 - alpha]
    else:
        a = check_alpha(alpha)
        weights = [a, 1.0 - a]
    # alpha and 1 - alpha: no sum to check (nor to synchronise for)
    return _mix([l1, l2], weights, ("l1", "l2"),
                _Options(backend, vocab, n_valid, group, vocab_start, check_sums=False))


def mix_logits_many(logits: Sequence[torch.Tensor], weights: Sequence[Weight] | torch.Tensor,
                    *, backend: str = "auto", vocab: str = "strict",
                    n_valid: int | None = None, group=None,
                    vocab_start: int | None = None, check: bool = True) -> torch.Tensor:
    """K-way mixture: log(sum_k weights[k] * softmax(logits[k])) over the last dim.

    weights: K floats, K tensors broadcast over the leading dims, or one tensor whose last
    dim is K (broadcast over the leading dims); each in [0, 1], summing to 1 (within 1e-5).
    Tensor weights live on the logits' device. check=False skips reading tensor weights'
    values (range and sums), as in `mix_logits`. Other arguments (group and vocab_start
    included) and the result as in `mix_logits`.
    """
    mix_checks.check_options(vocab, check, group, vocab_start)
    if isinstance(logits, torch.Tensor) or not isinstance(logits, Sequence):
        raise DTypeError(f"logits must be a sequence (list or tuple) of tensors, got "
                         f"{type(logits).__name__}")
    logits = list(logits)
    names = tuple(f"logits[{i}]" for i in range(len(logits)))
    mix_checks.check_logits(logits, names)
    weights = mix_checks.many_weights(weights, len(logits), logits[0].device, check)
    return _mix(logits, weights, names,
                _Options(backend, vocab, n_valid, group, vocab_start, check_sums=check))


# ---------------------------------------------------------------- dispatch


def _engine(backend: str, ls: list[torch.Tensor]):
    """The engine module for `backend` ("auto" takes Triton for CUDA tensors when the
    kernels can run them: K <= 4 and no float64)."""
    return engine_module(backend, ls, len(ls), MAX_TRITON_K, mix_torch, "mix_logits",
                         "logits tensors")


def _prepare(ls: list, names: tuple[str, ...], vocab: str, n_valid, group, vocab_start):
    """The logits cut to one width, and n_valid for these columns (None: all)."""
    if group is not None:
        from . import mix_parallel  # torch.distributed: imported only when asked for
        mix_parallel.check_group(group)
    ls = mix_checks.common_width(ls, names, vocab)
    if group is not None:
        return ls, mix_parallel.local_n_valid(n_valid, vocab_start, ls[0].shape[-1])
    return ls, mix_checks.check_n_valid(n_valid, ls[0].shape[-1])


@dataclass(frozen=True)
class _Options:
    """The options of one mix, checked by the public functions."""

    backend: str
    vocab: str
    n_valid: int | None
    group: object
    vocab_start: int | None
    check_sums: bool


def _mix(ls: list[torch.Tensor], weights: list[Weight], names: tuple[str, ...],
         opts: _Options) -> torch.Tensor:
    group = opts.group
    ls, n_valid = _prepare(ls, names, opts.vocab, opts.n_valid, group, opts.vocab_start)
    engine = _engine(opts.backend, ls)
    lead, V = ls[0].shape[:-1], ls[0].shape[-1]
    cd = mix_torch.compute_dtype(ls)
    if all(not isinstance(w, torch.Tensor) for w in weights):
        mix_checks.check_float_sum(weights)  # on the full list, before zero weights go
    keep = [k for k, w in enumerate(weights) if isinstance(w, torch.Tensor) or w > 0]
    ls, weights = [ls[k] for k in keep], [weights[k] for k in keep]  # w = 0: model unused
    W = _weights_matrix(weights, lead, cd, ls[0].device)
    if opts.check_sums and any(isinstance(w, torch.Tensor) for w in weights):
        mix_checks.check_row_sums(W)
    if group is None and len(ls) == 1 and not isinstance(weights[0], torch.Tensor):
        return _log_softmax(ls[0], cd, n_valid)  # one model, weight 1
    flat = [t.reshape(lead.numel(), V) for t in ls]
    if engine is not mix_torch:
        flat = [t if t.stride(-1) == 1 else t.contiguous() for t in flat]
    if flat[0].shape[0] == 0:  # no rows on any rank (the leading shape is shared)
        return torch.empty(*lead, V, dtype=cd, device=ls[0].device)
    if group is not None:
        from . import mix_parallel
        out = mix_parallel.ParallelMixFunction.apply(engine, n_valid, group, W, *flat)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (W, *flat)):
        out = _MixFunction.apply(engine, n_valid, W, *flat)
    else:  # nothing to differentiate (decoding): no autograd node, nothing saved
        out = engine.forward(flat, W, n_valid)[0]
    return out.view(*lead, V)


def _weights_matrix(weights: list[Weight], lead: torch.Size, cd: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """Weights as [rows or 1, K] in cd; autograd flows through tensor weights."""
    if all(not isinstance(w, torch.Tensor) for w in weights):
        return _constant_weights(tuple(weights), cd, device)
    cols = []
    for i, w in enumerate(weights):
        w = torch.as_tensor(w, dtype=cd, device=device)
        try:
            cols.append(torch.broadcast_to(w, lead).reshape(-1))
        except RuntimeError:
            raise ShapeMismatchError(
                f"weight {i} of shape {list(w.shape)} does not broadcast over the leading "
                f"dims {list(lead)}") from None
    return torch.stack(cols, dim=1)


@functools.lru_cache(maxsize=64)
def _constant_weights(weights: tuple[float, ...], cd: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    # Cached: decoding with a fixed alpha makes no host-to-device copy per step (and a
    # CUDA graph captured after a warm-up call reuses this very tensor).
    return torch.tensor([weights], dtype=cd, device=device)


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
