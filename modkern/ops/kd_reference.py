"""Distilling a mixture of teachers: the loss, specified in plain torch (docs/design.md 1.4).

For student logits s [N, V], teacher logits t_k [N, V_k], weights w_k >= 0 summing to 1 and
a temperature T:

    log p = log sum_k w_k softmax(t_k / T)        the target (teachers get no gradient)
    log q = log_softmax(s / T)                    the student
    forward_kl = sum_v p (log p - log q)
    reverse_kl = sum_v q (log q - log p)
    jsd        = (KL(p || m) + KL(q || m)) / 2,   m = (p + q) / 2

summed over the vocabulary per row (0 log 0 = 0), then averaged over the rows that are not
masked, times T^2 when asked (`scale_t2`). No row left: the loss is 0 (gradient 0).

The vocabulary the sums run over:
- widths that differ (padded heads: 151,936 against 152,064) are cut to the first
  min(V, V_k) columns of every tensor, as `mix_logits(vocab="common")` does;
- a column masked (-inf) in every teacher of non-zero weight has p = 0 and is left out of
  every sum, the student's softmax included: q is renormalised over the columns some
  teacher allows, and the student's logit at a left-out column gets gradient 0. (Reverse
  KL would otherwise be infinite for any student, and JSD would charge q log 2 there.)
- a row no teacher gives any mass (all -inf) gives NaN, as log_softmax does.

This module is the specification: evaluated in float32 (float64 for float64 input) and
differentiated by autograd, it is what the fused backends are tested against. The `where`s
keep every unselected branch finite, so its gradient is finite wherever the loss is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .mix_reference import mix_logits_many_reference

KINDS = ("forward_kl", "reverse_kl", "jsd")
NEG_INF = float("-inf")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_losses_reference(logq: torch.Tensor, logp: torch.Tensor, kind: str) -> torch.Tensor:
    """The divergence of each row [rows] from log q and log p [rows, V] (both -inf at the
    left-out columns)."""
    p, q = torch.exp(logp), torch.exp(logq)
    on_p, on_q = logp != NEG_INF, logq != NEG_INF
    if kind == "forward_kl":
        return (p * torch.where(on_p, logp - logq, 0.0)).sum(-1)
    if kind == "reverse_kl":
        return (q * torch.where(on_q, logq - logp, 0.0)).sum(-1)
    if kind != "jsd":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    # logaddexp(-inf, -inf) has a NaN gradient: the left-out columns take 0 in both instead
    logm = torch.logaddexp(torch.where(on_p, logp, 0.0), torch.where(on_p, logq, 0.0))
    logm = logm - math.log(2.0)
    kl_pm = p * torch.where(on_p, logp - logm, 0.0)
    kl_qm = q * torch.where(on_q, logq - logm, 0.0)
    return 0.5 * (kl_pm + kl_qm).sum(-1)


def mixture_kd_reference(student_logits: torch.Tensor,
                         teacher_logits: Sequence[torch.Tensor], weights: Sequence[float], *,
                         temperature: float = 1.0, kind: str = "forward_kl",
                         mask: torch.Tensor | None = None,
                         scale_t2: bool = False) -> torch.Tensor:
    """The mixture-of-teachers distillation loss (module docstring), a scalar.

    student_logits [..., V]; teacher_logits: K tensors [..., V_k] with the same leading
    shape (no gradient flows to them); weights: K floats; mask: bool of the leading shape,
    True for the rows that count (None: all)."""
    cd = compute_dtype(student_logits, *teacher_logits)
    V = min(t.shape[-1] for t in (student_logits, *teacher_logits))
    s = student_logits[..., :V].reshape(-1, V).to(cd)
    ts = [t.detach()[..., :V].reshape(-1, V).to(cd) for t in teacher_logits]
    if mask is not None:
        keep = mask.reshape(-1)
        s, ts = s[keep], [t[keep] for t in ts]
    logp = mix_logits_many_reference([t / temperature for t in ts], list(weights))
    z = (s / temperature).masked_fill(logp == NEG_INF, NEG_INF)
    logq = torch.log_softmax(z, dim=-1)
    rows = row_losses_reference(logq, logp, kind)
    factor = temperature ** 2 if scale_t2 else 1.0
    return rows.sum() * (factor / max(rows.shape[0], 1))
