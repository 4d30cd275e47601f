"""The Triton building blocks of the mixture kernels (kernels/mix_logits.py): loading the K
models' blocks of a row, their row statistics (max m_k and log s_k), log-softmax, the
weighted log-sum-exp of the mixture, and the per-span partials that decoding combines.
Each is a `triton.jit` function inlined into the kernels that call it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .convert import widen

NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel may read


@triton.jit
def row_starts(xs, x_row_strides, row, K: tl.constexpr):
    """Each model's pointer to the start of `row`."""
    starts = ()
    for k in tl.static_range(K):
        starts = starts + (xs[k] + row * x_row_strides[k],)
    return starts


@triton.jit
def load_block(starts, cols, load, K: tl.constexpr):
    """Every model's logits at `cols` as float32 (-inf where not `load`)."""
    xs = ()
    for k in tl.static_range(K):
        x = tl.load(starts[k] + cols, mask=load, other=NEG_INF)
        xs = xs + (widen(x, tl.float32),)
    return xs


@triton.jit
def span_stats(starts, n_valid, c0, c1, K: tl.constexpr, BLOCK: tl.constexpr):
    """Per model, (max, sum exp(x - max)) over the row's columns [c0, c1) below n_valid,
    each block read once for all K models. NaN in, NaN sum out; all -inf gives (-inf, 0)."""
    ms = ()
    ss = ()
    for k in tl.static_range(K):
        ms = ms + (tl.full([], NEG_INF, tl.float32),)
        ss = ss + (tl.full([], 0.0, tl.float32),)
    for start in range(c0, c1, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        xs = load_block(starts, cols, (cols < c1) & (cols < n_valid), K)
        new_ms = ()
        new_ss = ()
        for k in tl.static_range(K):
            m = tl.maximum(ms[k], tl.max(xs[k], axis=0))
            shift = tl.where(m == NEG_INF, 0.0, m)  # -inf - -inf would be NaN
            s = ss[k] * tl.exp(ms[k] - shift) + tl.sum(tl.exp(xs[k] - shift), axis=0)
            new_ms = new_ms + (m,)
            new_ss = new_ss + (s,)
        ms = new_ms
        ss = new_ss
    return ms, ss


@triton.jit
def load_stats(stats_ptr, row, K: tl.constexpr):
    """The row's (m_k, log s_k) for every model, from stats [R, K, 2]."""
    ms = ()
    lss = ()
    for k in tl.static_range(K):
        ms = ms + (tl.load(stats_ptr + (row * K + k) * 2),)
        lss = lss + (tl.load(stats_ptr + (row * K + k) * 2 + 1),)
    return ms, lss


@triton.jit
def load_weights(w_ptr, w_row_stride, row, K: tl.constexpr):
    ws = ()
    for k in tl.static_range(K):
        ws = ws + (tl.load(w_ptr + row * w_row_stride + k),)
    return ws


@triton.jit
def log_softmax(xs, ms, lss, K: tl.constexpr):
    """lp_k = (x_k - m_k) - log s_k: the max subtracted first, so lp_k is exact to an ulp
    of itself however large the logits."""
    lps = ()
    for k in tl.static_range(K):
        lps = lps + ((xs[k] - ms[k]) - lss[k],)
    return lps


@triton.jit
def logaddexp(a, b):
    """log(exp a + exp b); NaN if either is NaN; -inf if both are -inf."""
    mx = tl.where(a > b, a, b)
    d = a - b  # NaN when either is NaN (or both are -inf)
    r = mx + tl.log(1.0 + tl.exp(-tl.abs(d)))
    return tl.where(mx == NEG_INF, NEG_INF, r)


@triton.jit
def mixture(lps, ws, K: tl.constexpr):
    """logsumexp_k(log w_k + lp_k); a model of weight 0 is left out (even where lp_k is
    NaN), a column where every term is -inf gives -inf."""
    out = tl.where(ws[0] > 0, tl.log(ws[0]) + lps[0], NEG_INF)
    for k in tl.static_range(1, K):
        out = logaddexp(out, tl.where(ws[k] > 0, tl.log(ws[k]) + lps[k], NEG_INF))
    return out


@triton.jit
def share(lp, out):
    """e = p / q = exp(lp - out); 0 where the model has no mass (or a NaN row)."""
    return tl.where((lp == NEG_INF) | (lp != lp), 0.0, tl.exp(lp - out))


@triton.jit
def block_again(starts, g_row, cols, load, ms, lss, ws, K: tl.constexpr):
    """For the backward: a block's upstream gradient g, every model's lp_k, and out,
    recomputed from the logits and the row stats."""
    g = tl.load(g_row + cols, mask=load, other=0.0).to(tl.float32)
    lps = log_softmax(load_block(starts, cols, load, K), ms, lss, K)
    return g, lps, mixture(lps, ws, K)


@triton.jit
def write_span(starts, out_row, ws, ms, lss, c0, c1, n_valid, K: tl.constexpr,
                BLOCK: tl.constexpr):
    """The output of one row's columns [c0, c1), walking backwards: the blocks read last
    by the statistics sweep are the first read again. Reads sum_k b_k and writes 4 bytes
    per column."""
    n_blocks = tl.cdiv(c1 - c0, BLOCK)
    for i in range(0, n_blocks):
        cols = c0 + (n_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
        xs = load_block(starts, cols, (cols < c1) & (cols < n_valid), K)
        out = mixture(log_softmax(xs, ms, lss, K), ws, K)
        tl.store(out_row + cols, out, mask=cols < c1)


@triton.jit
def store_stats(stats_ptr, row, ms, ss, K: tl.constexpr):
    """stats[row, k] = (m_k, log s_k); returns the log sums."""
    lss = ()
    for k in tl.static_range(K):
        ls = tl.log(ss[k])
        tl.store(stats_ptr + (row * K + k) * 2, ms[k])
        tl.store(stats_ptr + (row * K + k) * 2 + 1, ls)
        lss = lss + (ls,)
    return lss


@triton.jit
def combine_partials(part_ptr, row, n_split, K: tl.constexpr, SPLITS: tl.constexpr):
    """A row's (m_k, s_k) from its n_split partial pairs, part [R, n_split, K, 2]."""
    i = tl.arange(0, SPLITS)
    ms = ()
    ss = ()
    for k in tl.static_range(K):
        at = ((row * n_split + i) * K + k) * 2
        pm = tl.load(part_ptr + at, mask=i < n_split, other=NEG_INF)
        ps = tl.load(part_ptr + at + 1, mask=i < n_split, other=0.0)
        m = tl.max(pm, axis=0)
        shift = tl.where(m == NEG_INF, 0.0, m)
        ms = ms + (m,)
        ss = ss + (tl.sum(ps * tl.exp(pm - shift), axis=0),)
    return ms, ss
