"""The mixture-of-teachers distillation loss of one row chunk in Triton: loss and gradient in
one kernel launch, one program per row, no [rows, V] temporary.

modkern/ops/mixture_kd.py computes a chunk's logits by torch matmuls and hands them here
(the engine interface of modkern/ops/kd_torch.py, with the teachers stacked [K, rows, V]).
For one row, with z = s / T and the teachers' t_k / T (spec: modkern/ops/kd_reference.py):

1. one sweep over the vocabulary: an online (max, sum-exp) per teacher gives lse_k, and,
   over the columns some teacher of non-zero weight allows (the support), one for z gives
   lse_z. The K teachers of a block are one [KP, BLOCK] tile, so K is a compile-time size,
   not K copies of the code.
2. a second sweep: log p = logsumexp_k(log w_k + t_k - lse_k), log q = z - lse_z, the row's
   sums; for forward KL it also writes the gradient q - p.
3. reverse KL and JSD need a row sum before their gradient q (f - sum q f): a third sweep
   writes it.
Gradients are written as grad_scale * d(row loss)/d s (the 1/T included), into any float
buffer, which may be the student's own (each block is read before it is written).
Offsets are 64-bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .convert import narrow, widen

STACKED = True  # teachers arrive as one [K, rows, V] tensor
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # as triton reads it
# Elements of one [KP, BLOCK] teacher tile; small under the interpreter so CI's small V
# still walks several blocks.
TILE = 512 if _INTERPRET else 8192
NUM_WARPS = 8
KINDS = ("forward_kl", "reverse_kl", "jsd")
LN2 = tl.constexpr(0.6931471805599453)  # log 2; a global a kernel may read


@triton.jit
def _teacher_tile(t_rows, ks, cols, K: tl.constexpr, V, inv_t):
    """The K teachers' t / T at these columns, [KP, BLOCK] float32 (-inf outside)."""
    ok = (ks[:, None] < K) & (cols[None, :] < V)
    t = tl.load(t_rows[:, None] + cols[None, :], mask=ok, other=float("-inf"))
    return widen(t, tl.float32) * inv_t


@triton.jit
def _online(m, s, x, axis: tl.constexpr):
    """(max, sum exp(x - max)) updated with a block x; all -inf keeps (-inf, 0)."""
    new_m = tl.maximum(m, tl.max(x, axis=axis))
    if axis == 1:
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    else:
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
    return new_m, s


@triton.jit
def _logs(s_row, t_rows, ks, cols, w, logw, lse_t, lse_z, K: tl.constexpr, V, inv_t):
    """log p and log q of one block (both -inf off the support, and past V)."""
    t = _teacher_tile(t_rows, ks, cols, K, V, inv_t)
    a = tl.where(w[:, None] > 0, logw[:, None] + (t - lse_t[:, None]), float("-inf"))
    mx = tl.max(a, axis=0)
    shift = tl.where(mx == float("-inf"), 0.0, mx)
    logp = shift + tl.log(tl.sum(tl.exp(a - shift[None, :]), axis=0))
    logp = tl.where(mx == float("-inf"), float("-inf"), logp)
    x = widen(tl.load(s_row + cols, mask=cols < V, other=0.0), tl.float32) * inv_t
    logq = tl.where(logp == float("-inf"), float("-inf"), x - lse_z)
    return logp, logq


@triton.jit
def _terms(logp, logq, KIND: tl.constexpr):
    """Per column: (loss term, f, q) with f the factor of the gradient q (f - sum q f)
    (forward KL: loss term and q only)."""
    q = tl.exp(logq)
    if KIND == 0:
        p = tl.exp(logp)
        term = tl.where(p == 0, 0.0, p * (logp - logq))  # NaN stays NaN
        f = q - p  # the gradient itself
    elif KIND == 1:
        f = tl.where(logq == float("-inf"), 0.0, logq - logp)
        term = q * f
    else:
        hi = tl.maximum(logp, logq)
        lo = tl.minimum(logp, logq)
        logm = tl.where(hi == float("-inf"), float("-inf"),
                        hi + tl.log(1.0 + tl.exp(lo - hi))) - LN2
        p = tl.exp(logp)
        f = 0.5 * tl.where(logq == float("-inf"), 0.0, logq - logm)
        term = 0.5 * tl.where(logp == float("-inf"), 0.0, p * (logp - logm)) + q * f
    return term, f, q


@triton.jit
def _kd_row_kernel(s_ptr, s_rs, t_ptr, t_ks, t_rs, w_ptr, g_ptr, g_rs, loss_ptr, V, inv_t,
                   grad_scale, K: tl.constexpr, KP: tl.constexpr, KIND: tl.constexpr,
                   WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One row: its loss into loss_ptr, and grad_scale * d loss / d z into g_ptr (the
    launcher folds dz/ds = 1/T into grad_scale)."""
    row = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, KP)
    w = tl.load(w_ptr + ks, mask=ks < K, other=0.0)
    logw = tl.log(tl.where(w > 0, w, 1.0))
    s_row = s_ptr + row * s_rs
    t_rows = t_ptr + ks.to(tl.int64) * t_ks + row * t_rs
    g_row = g_ptr + row * g_rs
    # 1. lse of each teacher over the vocabulary, of z over the support
    m_t = tl.full([KP], float("-inf"), tl.float32)
    s_t = tl.zeros([KP], tl.float32)
    m_z = float("-inf")
    s_z = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        t = _teacher_tile(t_rows, ks, cols, K, V, inv_t)
        m_t, s_t = _online(m_t, s_t, t, 1)
        live = tl.max(((w[:, None] > 0) & (t != float("-inf"))).to(tl.int32), axis=0) > 0
        x = widen(tl.load(s_row + cols, mask=cols < V, other=0.0), tl.float32) * inv_t
        m_z, s_z = _online(m_z, s_z, tl.where(live, x, float("-inf")), 0)
    lse_t = m_t + tl.log(s_t)
    lse_z = m_z + tl.log(s_z)
    # a row no teacher gives any mass is NaN, as log_softmax makes it (say so explicitly:
    # a GPU's max may drop the NaNs that would carry it)
    grad_scale = tl.where(m_z == float("-inf"), float("nan"), grad_scale)
    # 2. the row's sums (forward KL: and its gradient)
    loss = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        logp, logq = _logs(s_row, t_rows, ks, cols, w, logw, lse_t, lse_z, K, V, inv_t)
        term, f, q = _terms(logp, logq, KIND)
        loss += tl.where(cols < V, term, 0.0)
        if KIND == 0:
            if WRITE_GRAD:
                tl.store(g_row + cols, narrow(f * grad_scale, g_ptr.dtype.element_ty),
                         mask=cols < V)
    total = tl.sum(loss, axis=0)
    tl.store(loss_ptr + row, tl.where(m_z == float("-inf"), float("nan"), total))
    # 3. reverse KL and JSD: the gradient q (f - sum q f)
    if KIND != 0:
        if WRITE_GRAD:
            c = total  # reverse KL: sum q f is the loss
            if KIND == 2:
                acc = tl.zeros([BLOCK], tl.float32)
                for start in range(0, V, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    logp, logq = _logs(s_row, t_rows, ks, cols, w, logw, lse_t, lse_z, K, V,
                                       inv_t)
                    term, f, q = _terms(logp, logq, KIND)
                    acc += tl.where(cols < V, q * f, 0.0)
                c = tl.sum(acc, axis=0)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                logp, logq = _logs(s_row, t_rows, ks, cols, w, logw, lse_t, lse_z, K, V,
                                   inv_t)
                term, f, q = _terms(logp, logq, KIND)
                grad = q * (f - c) * grad_scale
                tl.store(g_row + cols, narrow(grad, g_ptr.dtype.element_ty), mask=cols < V)


def chunk_loss(s: torch.Tensor, teachers: torch.Tensor, weights, temperature: float,
               kind: str, grad_into: torch.Tensor | None = None,
               grad_scale: float = 1.0) -> torch.Tensor:
    """Each row's divergence [rows] float32; with grad_into ([rows, V], any float dtype,
    columns contiguous, may be s), grad_scale * d(row loss)/d s written there.
    s: [rows, V] bf16/fp16/fp32 (columns contiguous); teachers: [K, rows, V] (columns
    contiguous); weights: K floats."""
    K, R, V = teachers.shape
    KP = max(2, triton.next_power_of_2(K))
    w = torch.tensor(list(weights), dtype=torch.float32, device=s.device)
    loss = torch.empty(R, dtype=torch.float32, device=s.device)
    g = grad_into if grad_into is not None else s  # not written without WRITE_GRAD
    if R == 0:
        return loss
    _kd_row_kernel[(R,)](s, s.stride(0), teachers, teachers.stride(0), teachers.stride(1),
                         w, g, g.stride(0), loss, V, 1.0 / temperature,
                         grad_scale / temperature, K=K, KP=KP, KIND=KINDS.index(kind),
                         WRITE_GRAD=grad_into is not None, BLOCK=TILE // KP,
                         num_warps=NUM_WARPS)
    return loss
