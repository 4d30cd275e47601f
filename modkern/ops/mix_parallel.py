"""Vocab-parallel mixing: `mix_logits(..., group=)` when each process of a torch.distributed
group holds a slice of the vocabulary (tensor-parallel decoding, as a vocab-parallel LM
head leaves its logits).

Every output column needs only its own logits and, per row and model, the row's
statistics over the whole vocabulary: its max m_k and log s_k = log sum exp(x - m_k) (kept
apart, never rounded into one logsumexp: see modkern/ops/mix_torch.py); the rest of the
mixture is elementwise (docs/design.md 1.2). So each rank:

1. reduces its slice to a partial (max m, sum-exp s) per row and model (the engine's
   `local_stats`);
2. exchanges them in ONE collective, an all_gather of the [R, K] (m, s) pairs, and
   combines the P pairs locally: M = max_p m_p, log S = log(sum_p s_p exp(m_p - M)).
   (An all_reduce formulation needs two collectives, MAX of the maxima and then SUM of the
   rescaled sums, since the shift must be known before summing; the gathered pairs are
   P * R * K * 2 floats, a few KB when decoding, and every rank combines the same values in
   the same order, so the statistics are bit-identical on all ranks.);
3. writes its slice of the output from the global statistics (`forward(..., stats=)`).

Backward: grad l_k = g r_k - p_k c_k and grad w_k = d_k, where c_k = sum_j g_j r_kj and
d_k = sum_j g_j p_kj / q_j run over the whole vocabulary: each rank computes its slice's
share (`backward_sums`), ONE all_reduce SUM of [R, K] c (plus d when the weights need a
gradient: [R, 2K]) makes them global, and each rank writes its slices' gradients
(`backward_grads`). g on a rank is the gradient of the loss with respect to that rank's
output slice; the loss is the sum of what the ranks backpropagate (a loss replicated on
every rank, e.g. a vocab-parallel cross-entropy, fits that: each rank passes its slice of
the one gradient).

Weight gradients (alpha) are complete on every rank: d_k is already summed over the
vocabulary by the all_reduce, so a weight tensor replicated across the group receives the
same, full gradient on each rank. Do not all-reduce it again.
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import mix_torch
from ..errors import OptionError, ShapeMismatchError

NEG_INF = float("-inf")


def check_group(group) -> None:
    """`group` must be a torch.distributed process group this process belongs to
    (OptionError otherwise)."""
    if not dist.is_available() or not dist.is_initialized():
        raise OptionError("mix_logits(group=...) needs torch.distributed initialised "
                          "(torch.distributed.init_process_group) in every process")
    if not isinstance(group, dist.ProcessGroup):
        raise OptionError(f"group must be a torch.distributed ProcessGroup (e.g. "
                          f"torch.distributed.group.WORLD), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise OptionError("group: this process is not a member of the given process group")


def local_n_valid(n_valid: int | None, vocab_start: int | None, width: int) -> int | None:
    """The columns of a slice [vocab_start, vocab_start + width) below the global n_valid:
    None (all of them) or 0 <= count < width."""
    if vocab_start is not None and (isinstance(vocab_start, bool)
                                    or not isinstance(vocab_start, numbers.Integral)
                                    or vocab_start < 0):
        raise ShapeMismatchError(f"vocab_start must be an int >= 0 (this rank's first "
                                 f"vocabulary column), got {vocab_start!r}")
    if n_valid is None:
        return None
    if isinstance(n_valid, bool) or not isinstance(n_valid, numbers.Integral) or n_valid < 1:
        raise ShapeMismatchError(f"n_valid must be an int >= 1 (the number of valid "
                                 f"columns of the whole vocabulary), got {n_valid!r}")
    if vocab_start is None:
        raise ShapeMismatchError("n_valid with group= counts columns of the whole vocabulary: "
                                 "pass vocab_start= (this rank's first column) too")
    here = min(max(int(n_valid) - int(vocab_start), 0), width)
    return None if here == width else here


def merge_stats(m: torch.Tensor, s: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine partial (max, sum exp(x - max)) pairs along `dim`. NaN stays NaN; pairs that
    are all (-inf, 0) give (-inf, 0)."""
    M = m.amax(dim, keepdim=True)
    shift = torch.where(M == NEG_INF, 0.0, M)  # -inf - -inf would be NaN
    S = (s * torch.exp(m - shift)).sum(dim)
    return M.squeeze(dim), S


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None)  # torch >= 2.12's name
    if gather is None:
        gather = dist.all_gather_into_tensor
    gather(out, x, group=group)


def global_stats(m: torch.Tensor, s: torch.Tensor, group) -> torch.Tensor:
    """The rows' statistics (M, log S) [R, K, 2] over the whole vocabulary from this rank's
    partial (m, s) [R, K]: one all_gather, then the same local combination on every rank.
    +inf logits make the row NaN, as log_softmax of the whole row would."""
    world = dist.get_world_size(group)
    mine = torch.stack([m, s]).contiguous()
    everyone = torch.empty((world * mine.numel(),), dtype=mine.dtype, device=mine.device)
    _all_gather(everyone, mine.view(-1), group)
    everyone = everyone.view(world, *mine.shape)
    M, S = merge_stats(everyone[:, 0], everyone[:, 1], dim=0)
    M = torch.where(M == float("inf"), float("nan"), M)
    return torch.stack([M, torch.log(S)], -1)


class ParallelMixFunction(torch.autograd.Function):
    """out = log(sum_k W[:, k] softmax(l_k)) on this rank's columns of [rows, V_global];
    the softmaxes are over the whole vocabulary, spread over `group`."""

    @staticmethod
    def forward(ctx, engine, n_valid, group, W, *ls):
        R, V = ls[0].shape
        K = len(ls)
        empty = n_valid == 0 or V == 0  # this rank holds no valid column: takes part only
        if empty:
            cd = mix_torch.compute_dtype(ls)
            m = torch.full((R, K), NEG_INF, dtype=cd, device=ls[0].device)
            s = torch.zeros_like(m)
        else:
            m, s = merge_stats(*engine.local_stats(ls, n_valid), dim=1)
        stats = global_stats(m, s, group)
        if empty:
            out = torch.full((R, V), NEG_INF, dtype=stats.dtype, device=ls[0].device)
        else:
            out, _ = engine.forward(ls, W.detach(), n_valid, stats=stats)
        ctx.engine, ctx.n_valid, ctx.group, ctx.empty = engine, n_valid, group, empty
        ctx.save_for_backward(W, stats, *ls)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        W, stats, *ls = ctx.saved_tensors
        engine, n_valid = ctx.engine, ctx.n_valid
        need_w = ctx.needs_input_grad[3]
        if ctx.empty:
            c = torch.zeros_like(stats[..., 0])
            d = torch.zeros_like(c)
        else:
            c, d = engine.backward_sums(ls, W, stats, g, n_valid)
        K = len(ls)
        sums = torch.cat([c, d], 1) if need_w else c.contiguous()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.empty:
            grads = [torch.zeros_like(l) for l in ls]
        else:
            grads = engine.backward_grads(ls, W, stats, g, sums[:, :K], n_valid)
        gW = None
        if need_w:
            gW = sums[:, K:].to(W.dtype)
            gW = gW if W.shape[0] > 1 else gW.sum(0, keepdim=True)
        return (None, None, None, gW, *grads)
