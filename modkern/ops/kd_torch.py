"""The mixture-of-teachers distillation loss of one row chunk, in plain torch (the CPU engine).

`modkern/ops/mixture_kd.py` walks the rows in chunks and hands each chunk's student and
teacher logits ([rows, V], already cut to the common vocabulary) to an engine:

    chunk_loss(s, teachers, weights, temperature, kind, grad_into, grad_scale) -> [rows]

returning each row's divergence and, when `grad_into` is given, writing
grad_scale * d(row loss)/d s into it (it may be `s` itself: s is read first). The Triton
engine (modkern.kernels.mixture_kd) has the same interface and takes the teachers stacked
[K, rows, V] (`STACKED = True`).

The target log p is `mix_logits_many` (the mixture machinery, exact in the log domain where
a probability underflows) of the teachers' logits / T. With z = s / T, left out (-inf) where
log p is -inf, log q = log_softmax(z) and, per row (d/dz; d/ds = d/dz / T):

    forward_kl   L = sum p (log p - log q)               dL/dz = q - p
    reverse_kl   L = sum q f,  f = log q - log p         dL/dz = q (f - L)
    jsd          L = (sum p (log p - log m) + sum q (log q - log m)) / 2
                 f = (log q - log m) / 2                 dL/dz = q (f - sum q f)

(with terms at p = 0 or q = 0 taken as 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .kd_reference import NEG_INF, compute_dtype
from .mix import mix_logits_many

STACKED = False  # teachers arrive as a list of [rows, V] tensors
# Elements of one [rows, V] temporary: the rows of a chunk are taken a few at a time so
# the loss's half-dozen float32 temporaries stay small (a few MB each) however large the
# chunk the matmuls want.
SUB_ELEMENTS = 1 << 20


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise sum of a * b, [rows], with no [rows, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _target(teachers: Sequence[torch.Tensor], weights: Sequence[float], inv_t: float,
            cd: torch.dtype) -> torch.Tensor:
    """log p [rows, V] in cd: the mixture of the teachers' softmaxes at temperature 1/inv_t."""
    if inv_t != 1.0:
        teachers = [t.to(cd, copy=True).mul_(inv_t) for t in teachers]
    return mix_logits_many(list(teachers), list(weights), backend="torch").to(cd)


def _student(s: torch.Tensor, logp: torch.Tensor, inv_t: float, cd: torch.dtype):
    """log q [rows, V]: log_softmax of s / T over the columns where log p > -inf."""
    z = s.to(cd, copy=True)
    if inv_t != 1.0:
        z.mul_(inv_t)
    z.masked_fill_(logp == NEG_INF, NEG_INF)
    return torch.log_softmax(z, dim=-1)


def _forward_kl(logp, logq, want_grad):
    p = torch.exp(logp)
    t = torch.sub(logp, logq).masked_fill_(p == 0, 0.0)  # p = 0: the term is 0
    rows = _dot(p, t)
    if not want_grad:
        return rows, None
    grad = torch.exp(logq, out=t).sub_(p)  # q - p
    return rows, grad


def _reverse_kl(logp, logq, want_grad):
    q = torch.exp(logq)
    f = torch.sub(logq, logp).masked_fill_(logq == NEG_INF, 0.0)  # q = 0: the term is 0
    rows = _dot(q, f)
    if not want_grad:
        return rows, None
    return rows, f.sub_(rows[:, None]).mul_(q)


def _jsd(logp, logq, want_grad):
    logm = torch.logaddexp(logp, logq).sub_(math.log(2.0))
    p = torch.exp(logp)
    a = torch.sub(logp, logm).masked_fill_(logp == NEG_INF, 0.0)
    kl_pm = _dot(p, a)
    del p, a
    q = torch.exp(logq)
    f = torch.sub(logq, logm, out=logm).masked_fill_(logq == NEG_INF, 0.0).mul_(0.5)
    c = _dot(q, f)  # sum q f = KL(q || m) / 2
    rows = 0.5 * kl_pm + c
    if not want_grad:
        return rows, None
    return rows, f.sub_(c[:, None]).mul_(q)


_KINDS = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd}


def chunk_loss(s: torch.Tensor, teachers: Sequence[torch.Tensor], weights: Sequence[float],
               temperature: float, kind: str, grad_into: torch.Tensor | None = None,
               grad_scale: float = 1.0) -> torch.Tensor:
    """Each row's divergence [rows] (float32; float64 for float64 input); with grad_into
    ([rows, V], any float dtype), grad_scale * d(row loss)/d s written there."""
    cd = compute_dtype(s, *teachers)
    inv_t = 1.0 / temperature
    R, V = s.shape[0], teachers[0].shape[-1]
    out = torch.empty(R, dtype=cd, device=s.device)
    step = max(1, SUB_ELEMENTS // max(V, 1))
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        logp = _target([t[r0:r1] for t in teachers], weights, inv_t, cd)
        logq = _student(s[r0:r1], logp, inv_t, cd)
        rows, grad = _KINDS[kind](logp, logq, grad_into is not None)
        out[r0:r1] = rows
        if grad is not None:
            grad_into[r0:r1].copy_(grad.mul_(grad_scale * inv_t))
    return out
