"""Mixture of K next-token distributions in Triton: out = logsumexp_k(log w_k + l_k - lse_k).

Every kernel reads the K logits tensors (up to 4, any float dtype, rows strided, columns
contiguous) and never materializes a softmax. Per row, each model needs one number, its
logsumexp lse_k; from it every column's output follows elementwise.

Forward, two layouts:
- many rows (training): `_fwd_row_kernel`, one program per row: an online max/sum-exp over
  V in BLOCK chunks gives lse_k, then a second sweep writes the output, walking the row
  backwards so the chunks read last in the first sweep are still in L2.
- few rows (decoding, 1..64 rows of 152K): one program per row cannot fill the GPU, so the
  vocabulary is split into S spans: `_fwd_stats_kernel` writes each span's partial
  (max, sum-exp), `_fwd_out_kernel` combines a row's S partials on chip and writes its
  span. Two launches, grid sizes from shapes only, no host synchronisation: capturable in
  a CUDA graph.

Backward (g = dL/dout; r_k = w_k p_k / q, the share of model k in the mixture q):
    grad l_k = g * r_k - p_k * c_k,   c_k = sum_j g_j r_kj,   grad w_k = sum_j g_j p_kj / q_j
`_bwd_sums_kernel` writes per-span partial c_k and grad w_k, `_bwd_grad_kernel` writes the
gradients; both recompute out, r_k and p_k from the logits and the saved lse_k.

Offsets are 64-bit (rows x V passes 2**31 at training sizes). The launchers follow the
engine interface of modkern/ops/mix_torch.py, including the pieces a vocabulary split across
processes needs (`local_stats`, `forward(..., lse=)`, `backward_sums`, `backward_grads`:
see modkern/ops/mix_parallel.py); `_fwd_given_lse_kernel` writes a slice's output from its
rows' global lse_k.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_K = 4
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # as triton reads it
# Columns per chunk: 4096 keeps 16 KB of each fp32 row chunk in registers on a GPU; small
# under the interpreter so CI's small V still walks several chunks and spans.
BLOCK = 1024 if _INTERPRET else 4096
NUM_WARPS = 8
MAX_SPLITS = 256


@triton.jit
def _put(k: tl.constexpr, v, a0, a1, a2, a3):
    """(a0, a1, a2, a3) with a_k replaced by v, for a compile-time k (_pick's inverse)."""
    if k == 0:
        a0 = v
    if k == 1:
        a1 = v
    if k == 2:
        a2 = v
    if k == 3:
        a3 = v
    return a0, a1, a2, a3


@triton.jit
def _pick(k: tl.constexpr, a0, a1, a2, a3):
    """a_k for a compile-time k (the K tensors arrive as separate arguments)."""
    v = a0
    if k == 1:
        v = a1
    if k == 2:
        v = a2
    if k == 3:
        v = a3
    return v


@triton.jit
def _span_stats(base, nv, c0, c1, BLOCK: tl.constexpr):
    """(max, sum exp(x - max)) of one row's columns [c0, c1), columns >= nv as -inf.
    NaN in, NaN out; all -inf gives (-inf, 0)."""
    m = float("-inf")
    s = 0.0
    for start in range(c0, c1, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=(cols < c1) & (cols < nv), other=float("-inf"))
        x = x.to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # -inf - -inf would be NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = new_m
    return m, s


@triton.jit
def _logaddexp(a, b):
    """log(exp a + exp b); NaN if either is NaN; -inf if both are -inf."""
    mx = tl.where(a > b, a, b)
    d = a - b  # NaN when either is NaN (or both are -inf)
    r = mx + tl.log(1.0 + tl.exp(-tl.abs(d)))
    return tl.where(mx == float("-inf"), float("-inf"), r)


@triton.jit
def _row_weights(w_ptr, row, w_rs, k: tl.constexpr):
    w = tl.load(w_ptr + row * w_rs + k).to(tl.float32)
    return w, tl.log(w)


@triton.jit
def _term(x, lse, w, logw):
    """log w + log_softmax, and -inf for a model with weight 0 (even if x is NaN)."""
    return tl.where(w > 0, logw + (x - lse), float("-inf"))


@triton.jit
def _write_block(p0, p1, p2, p3, out_row, w_ptr, w_rs, row, lse0, lse1, lse2, lse3,
                 cols, nv, V, K: tl.constexpr):
    load = cols < nv
    res = tl.full(cols.shape, float("-inf"), tl.float32)
    for k in tl.static_range(K):
        x = tl.load(_pick(k, p0, p1, p2, p3) + cols, mask=load, other=float("-inf"))
        w, logw = _row_weights(w_ptr, row, w_rs, k)
        t = _term(x.to(tl.float32), _pick(k, lse0, lse1, lse2, lse3), w, logw)
        if k == 0:
            res = t
        else:
            res = _logaddexp(res, t)
    tl.store(out_row + cols, res, mask=cols < V)


@triton.jit
def _fwd_row_kernel(p0, p1, p2, p3, rs0, rs1, rs2, rs3, w_ptr, w_rs, out_ptr, lse_ptr,
                    nv, V, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b0, b1, b2, b3 = p0 + row * rs0, p1 + row * rs1, p2 + row * rs2, p3 + row * rs3
    lse0, lse1, lse2, lse3 = 0.0, 0.0, 0.0, 0.0
    for k in tl.static_range(K):
        m, s = _span_stats(_pick(k, b0, b1, b2, b3), nv, 0, V, BLOCK)
        lse = m + tl.log(s)  # all -inf: -inf (then the row is NaN, as log_softmax's)
        tl.store(lse_ptr + row * K + k, lse)
        lse0, lse1, lse2, lse3 = _put(k, lse, lse0, lse1, lse2, lse3)
    n_blocks = tl.cdiv(V, BLOCK)
    for i in range(0, n_blocks):  # backwards: the row's tail is the freshest in cache
        cols = (n_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
        _write_block(b0, b1, b2, b3, out_ptr + row * V, w_ptr, w_rs, row,
                     lse0, lse1, lse2, lse3, cols, nv, V, K)


@triton.jit
def _fwd_stats_kernel(p0, p1, p2, p3, rs0, rs1, rs2, rs3, pm_ptr, ps_ptr, nv, V, span,
                      K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    n_split = tl.num_programs(1)
    c0 = sid * span
    c1 = tl.minimum(c0 + span, V)
    for k in tl.static_range(K):
        base = _pick(k, p0 + row * rs0, p1 + row * rs1, p2 + row * rs2, p3 + row * rs3)
        m, s = _span_stats(base, nv, c0, c1, BLOCK)
        at = (row * n_split + sid) * K + k
        tl.store(pm_ptr + at, m)
        tl.store(ps_ptr + at, s)


@triton.jit
def _combine(pm_ptr, ps_ptr, row, n_split, k: tl.constexpr, K: tl.constexpr,
             SPLITS: tl.constexpr):
    """lse of one row and model from its n_split partial (max, sum-exp) pairs."""
    i = tl.arange(0, SPLITS)
    at = (row * n_split + i) * K + k
    pm = tl.load(pm_ptr + at, mask=i < n_split, other=float("-inf"))
    ps = tl.load(ps_ptr + at, mask=i < n_split, other=0.0)
    m = tl.max(pm, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.sum(ps * tl.exp(pm - shift), axis=0))


@triton.jit
def _fwd_out_kernel(p0, p1, p2, p3, rs0, rs1, rs2, rs3, w_ptr, w_rs, pm_ptr, ps_ptr,
                    out_ptr, lse_ptr, nv, V, span, K: tl.constexpr, SPLITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    n_split = tl.num_programs(1)
    lse0, lse1, lse2, lse3 = 0.0, 0.0, 0.0, 0.0
    for k in tl.static_range(K):
        lse = _combine(pm_ptr, ps_ptr, row, n_split, k, K, SPLITS)
        if sid == 0:
            tl.store(lse_ptr + row * K + k, lse)
        lse0, lse1, lse2, lse3 = _put(k, lse, lse0, lse1, lse2, lse3)
    _write_span(p0, p1, p2, p3, rs0, rs1, rs2, rs3, w_ptr, w_rs, out_ptr, row, sid * span,
                lse0, lse1, lse2, lse3, nv, V, span, K, BLOCK)


@triton.jit
def _write_span(p0, p1, p2, p3, rs0, rs1, rs2, rs3, w_ptr, w_rs, out_ptr, row, c0,
                lse0, lse1, lse2, lse3, nv, V, span, K: tl.constexpr, BLOCK: tl.constexpr):
    """The output of one row's columns [c0, c0 + span), given the row's lse_k."""
    b0, b1, b2, b3 = p0 + row * rs0, p1 + row * rs1, p2 + row * rs2, p3 + row * rs3
    c1 = tl.minimum(c0 + span, V)
    for start in range(c0, c1, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        _write_block(b0, b1, b2, b3, out_ptr + row * V, w_ptr, w_rs, row,
                     lse0, lse1, lse2, lse3, tl.where(cols < c1, cols, V), nv, V, K)


@triton.jit
def _fwd_given_lse_kernel(p0, p1, p2, p3, rs0, rs1, rs2, rs3, w_ptr, w_rs, out_ptr, lse_ptr,
                          nv, V, span, K: tl.constexpr, BLOCK: tl.constexpr):
    """The output of a vocabulary slice from its rows' global lse_k (mix_parallel)."""
    row = tl.program_id(0).to(tl.int64)
    lse0 = tl.load(lse_ptr + row * K)
    lse1, lse2, lse3 = lse0, lse0, lse0
    if K > 1:
        lse1 = tl.load(lse_ptr + row * K + 1)
    if K > 2:
        lse2 = tl.load(lse_ptr + row * K + 2)
    if K > 3:
        lse3 = tl.load(lse_ptr + row * K + 3)
    _write_span(p0, p1, p2, p3, rs0, rs1, rs2, rs3, w_ptr, w_rs, out_ptr, row,
                tl.program_id(1) * span, lse0, lse1, lse2, lse3, nv, V, span, K, BLOCK)


@triton.jit
def _bwd_block(p0, p1, p2, p3, g_row, w_ptr, w_rs, row, lse_ptr, cols, nv, k: tl.constexpr,
               K: tl.constexpr):
    """For one block of columns and one model k: (g, r_k, p_k/q, p_k) recomputed."""
    load = cols < nv
    g = tl.load(g_row + cols, mask=load, other=0.0).to(tl.float32)
    out = tl.full(cols.shape, float("-inf"), tl.float32)
    t_k = out
    lp_k = out
    for j in tl.static_range(K):
        x = tl.load(_pick(j, p0, p1, p2, p3) + cols, mask=load, other=float("-inf"))
        w, logw = _row_weights(w_ptr, row, w_rs, j)
        lp = x.to(tl.float32) - tl.load(lse_ptr + row * K + j)
        t = _term(x.to(tl.float32), tl.load(lse_ptr + row * K + j), w, logw)
        if j == 0:
            out = t
        else:
            out = _logaddexp(out, t)
        if j == k:
            t_k = t
            lp_k = lp
    r = tl.where(t_k == float("-inf"), 0.0, tl.exp(t_k - out))
    # p_k / q; 0 where model k has no mass (or is a dropped NaN row), or nothing asks
    e = tl.where((lp_k == float("-inf")) | (lp_k != lp_k) | (g == 0), 0.0,
                 tl.exp(lp_k - out))
    p = tl.where(lp_k != lp_k, 0.0, tl.exp(lp_k))
    return g, r, e, p


@triton.jit
def _bwd_sums_kernel(p0, p1, p2, p3, rs0, rs1, rs2, rs3, g_ptr, g_rs, w_ptr, w_rs, lse_ptr,
                     pc_ptr, pd_ptr, nv, V, span, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    n_split = tl.num_programs(1)
    b0, b1, b2, b3 = p0 + row * rs0, p1 + row * rs1, p2 + row * rs2, p3 + row * rs3
    c0 = sid * span
    c1 = tl.minimum(c0 + span, nv)
    for k in tl.static_range(K):
        c = tl.zeros([BLOCK], tl.float32)
        d = tl.zeros([BLOCK], tl.float32)
        for start in range(c0, c1, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            cols = tl.where(cols < c1, cols, nv)  # past the span: masked like padding
            g, r, e, p = _bwd_block(b0, b1, b2, b3, g_ptr + row * g_rs, w_ptr, w_rs, row,
                                    lse_ptr, cols, nv, k, K)
            c += g * r
            d += g * e
        at = (row * n_split + sid) * K + k
        tl.store(pc_ptr + at, tl.sum(c, axis=0))
        tl.store(pd_ptr + at, tl.sum(d, axis=0))


@triton.jit
def _bwd_grad_kernel(p0, p1, p2, p3, rs0, rs1, rs2, rs3, q0, q1, q2, q3, g_ptr, g_rs,
                     w_ptr, w_rs, lse_ptr, c_ptr, nv, V, span, K: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    b0, b1, b2, b3 = p0 + row * rs0, p1 + row * rs1, p2 + row * rs2, p3 + row * rs3
    c0 = sid * span
    c1 = tl.minimum(c0 + span, V)
    for k in tl.static_range(K):
        c_k = tl.load(c_ptr + row * K + k)
        w, _ = _row_weights(w_ptr, row, w_rs, k)
        dst = _pick(k, q0, q1, q2, q3) + row * V
        for start in range(c0, c1, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g, r, e, p = _bwd_block(b0, b1, b2, b3, g_ptr + row * g_rs, w_ptr, w_rs, row,
                                    lse_ptr, cols, nv, k, K)
            grad = tl.where(w > 0, g * r - p * c_k, 0.0)
            tl.store(dst + cols, grad.to(dst.dtype.element_ty), mask=cols < c1)


# ---------------------------------------------------------------- launchers


def _device_programs(device: torch.device) -> int:
    """Programs that fill the device: a few per SM (under the interpreter: a small number,
    so CI exercises the split path)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _split(rows: int, V: int, device: torch.device) -> tuple[int, int]:
    """(spans per row, columns per span): one span per row once the rows alone fill the
    device, else enough spans (whole BLOCKs each) to give every SM work."""
    want = _device_programs(device)
    if rows >= want:
        return 1, V
    splits = min(MAX_SPLITS, triton.cdiv(V, BLOCK), triton.cdiv(want, rows))
    span = triton.cdiv(triton.cdiv(V, splits), BLOCK) * BLOCK
    return triton.cdiv(V, span), span


def _args(ls):
    """The K logits tensors and their row strides, padded to MAX_K arguments."""
    ts = list(ls) + [ls[0]] * (MAX_K - len(ls))
    return ts + [t.stride(0) for t in ts]


def _weights(W: torch.Tensor):
    W = W.to(torch.float32).contiguous()
    return W, (W.shape[1] if W.shape[0] > 1 else 0)


def _spans(R: int, V: int, dev: torch.device, splits: int | None) -> tuple[int, int]:
    """(spans per row, columns per span), forced to `splits` spans when given."""
    if splits is None:
        return _split(R, V, dev)
    span = triton.cdiv(triton.cdiv(V, splits), BLOCK) * BLOCK
    return triton.cdiv(V, span), span


def local_stats(ls, n_valid: int | None, splits: int | None = None):
    """Per row, span and model the partial (max, sum exp(x - max)) over the columns
    < n_valid, [R, S, K] float32 each (the logsumexp of a row is their combination)."""
    R, V = ls[0].shape
    nv = V if n_valid is None else n_valid
    n_split, span = _spans(R, V, ls[0].device, splits)
    pm = torch.empty(R, n_split, len(ls), dtype=torch.float32, device=ls[0].device)
    ps = torch.empty_like(pm)
    _fwd_stats_kernel[(R, n_split)](*_args(ls), pm, ps, nv, V, span, K=len(ls), BLOCK=BLOCK,
                                    num_warps=NUM_WARPS)
    return pm, ps


def forward(ls, W: torch.Tensor, n_valid: int | None, splits: int | None = None,
            lse: torch.Tensor | None = None):
    """out [R, V] float32 and lse [R, K] (saved for the backward). splits: force the
    number of vocabulary spans per row (None: chosen from the shape). lse: the rows'
    logsumexps when the rows extend beyond these columns (a vocabulary slice)."""
    R, V = ls[0].shape
    K = len(ls)
    nv = V if n_valid is None else n_valid
    dev = ls[0].device
    W, w_rs = _weights(W)
    out = torch.empty(R, V, dtype=torch.float32, device=dev)
    n_split, span = _spans(R, V, dev, splits)
    if lse is not None:
        lse = lse.to(torch.float32).contiguous()
        _fwd_given_lse_kernel[(R, n_split)](*_args(ls), W, w_rs, out, lse, nv, V, span, K=K,
                                            BLOCK=BLOCK, num_warps=NUM_WARPS)
        return out, lse
    lse = torch.empty(R, K, dtype=torch.float32, device=dev)
    if n_split == 1 and splits is None:
        _fwd_row_kernel[(R,)](*_args(ls), W, w_rs, out, lse, nv, V, K=K, BLOCK=BLOCK,
                              num_warps=NUM_WARPS)
        return out, lse
    pm = torch.empty(R, n_split, K, dtype=torch.float32, device=dev)
    ps = torch.empty_like(pm)
    _fwd_stats_kernel[(R, n_split)](*_args(ls), pm, ps, nv, V, span, K=K, BLOCK=BLOCK,
                                    num_warps=NUM_WARPS)
    _fwd_out_kernel[(R, n_split)](*_args(ls), W, w_rs, pm, ps, out, lse, nv, V, span, K=K,
                                  SPLITS=max(2, triton.next_power_of_2(n_split)),
                                  BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, lse


def backward(ls, W: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, n_valid: int | None,
             need_w: bool, splits: int | None = None):
    """Gradients of sum(g * out) to each logits tensor (in its dtype) and to W."""
    g = g if g.stride(-1) == 1 else g.contiguous()  # once, for both kernels (g may be an
    # expanded scalar gradient)
    c, d = backward_sums(ls, W, lse, g, n_valid, splits)
    grads = backward_grads(ls, W, lse, g, c, n_valid, splits)
    if not need_w:
        return grads, None
    gW = d.to(W.dtype)
    return grads, (gW if W.shape[0] > 1 else gW.sum(0, keepdim=True))


def backward_sums(ls, W: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                  n_valid: int | None, splits: int | None = None):
    """Per row and model c_k = sum_j g_j r_kj and d_k = sum_j g_j p_kj / q_j (= grad w_k)
    over these columns, [R, K] float32 each."""
    R, V = ls[0].shape
    nv = V if n_valid is None else n_valid
    Wf, w_rs = _weights(W)
    g = g if g.stride(-1) == 1 else g.contiguous()
    n_split, span = _spans(R, V, ls[0].device, splits)
    pc = torch.empty(R, n_split, len(ls), dtype=torch.float32, device=ls[0].device)
    pd = torch.empty_like(pc)
    _bwd_sums_kernel[(R, n_split)](*_args(ls), g, g.stride(0), Wf, w_rs, lse, pc, pd, nv, V,
                                   span, K=len(ls), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return pc.sum(1), pd.sum(1)


def backward_grads(ls, W: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, c: torch.Tensor,
                   n_valid: int | None, splits: int | None = None):
    """Gradients to each logits tensor (in its dtype), given the rows' c [R, K]."""
    R, V = ls[0].shape
    K = len(ls)
    nv = V if n_valid is None else n_valid
    dev = ls[0].device
    Wf, w_rs = _weights(W)
    g = g if g.stride(-1) == 1 else g.contiguous()
    c = c.to(torch.float32).contiguous()
    n_split, span = _spans(R, V, dev, splits)
    grads = [torch.empty(R, V, dtype=l.dtype, device=dev) for l in ls]
    gpad = grads + [grads[0]] * (MAX_K - K)
    _bwd_grad_kernel[(R, n_split)](*_args(ls), *gpad, g, g.stride(0), Wf, w_rs, lse, c, nv,
                                   V, span, K=K, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grads
