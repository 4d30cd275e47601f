"""Mixture of distributions over logits in plain torch, chunked for the CPU.

The engine behind `mix_logits(..., backend="torch")`. Rows are processed a few at a time so
every temporary ([rows_in_chunk, V] float32) stays in cache; per chunk the forward is

    p_k = softmax(l_k)            (one fused ATen kernel each, float32 even for bf16 input)
    q   = sum_k w_k * p_k         (in place)
    out = log(q)

which costs one exp per input element and one log per output element, about the eager
formula's arithmetic but without its trips through main memory. log(q) is accurate while q
is a normal float; where q < TINY (a probability below ~1e-30, or an exact 0 from masked
columns) the few elements are recomputed in the log domain,
`logsumexp_k(log w_k + l_k - logsumexp(l_k))`, so huge logit gaps and -inf columns are exact.

The backward recomputes the softmaxes instead of storing them. With h = g / q and
d_k = sum_j h_j p_kj (= d out / d w_k summed against g):

    grad l_k = w_k * p_k * (h - d_k)          grad w_k = d_k

again with a log-domain fix-up where q < TINY. A model whose weight is 0 is dropped from its
rows entirely (its logits may even be NaN there), so alpha = 0 or 1 never makes a NaN.

Engine interface (shared with modkern.kernels.mix_logits):
    forward(ls, W, n_valid, stats=None) -> (out, saved)
    backward(ls, W, saved, g, n_valid, need_w) -> (grads, grad_W or None)
ls: K tensors [R, V]; W: weights [R or 1, K]; columns >= n_valid count as -inf.
For a vocabulary split across processes (modkern/ops/mix_parallel.py), the same work in pieces
that meet at the two row-wise reductions, each row's statistics per model and the sums c_k, d_k:
    local_stats(ls, n_valid) -> (m, s)       partial (max, sum exp(x - max)), [R, S, K]
    forward(..., stats=[R, K, 2])            the softmaxes as exp((l_k - m_k) - log s_k)
    backward_sums(ls, W, stats, g, n_valid) -> (c, d)        this slice's share, [R, K]
    backward_grads(ls, W, stats, g, c, n_valid) -> grads     with the global c
A row's statistics are (m_k, log s_k), its max and log sum exp(x - max), kept apart rather
than added into one logsumexp: rounding lse_k = m_k + log s_k to the float would shift every
log-probability of a row with logits near 1e4 by up to 5e-4 (an ulp of 1e4 is 1e-3).
"""

from __future__ import annotations

import math
import threading

import torch

# Elements per chunk temporary: 4 of them (float32) should sit in a core's L2 (4 MiB here).
CHUNK = 1 << 17
# Up to this many rows the forward mixes all rows at once, not in row chunks (_few_rows).
FEW_ROWS = 8


def compute_dtype(ls) -> torch.dtype:
    """float64 when any input is float64 (gradcheck), float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ls) else torch.float32


def _tiny(cd: torch.dtype) -> float:
    # Below this, q = sum w_k p_k may have lost its digits to underflow: recompute in logs.
    return 1e-30 if cd == torch.float32 else 1e-290


_softmax_out = torch.ops.aten._softmax.out  # softmax into a given buffer


_local = threading.local()


def _workspace(numel: int, cd: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of numel elements. On the CPU it is kept per thread between calls
    (at most (K + 3) chunks: a few MB): blocks this large go back to the OS when freed,
    and touching fresh ones again costs a page fault per 4 KB, more than the arithmetic
    of a decoding step."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=cd, device=device)  # the caching allocator reuses
    cache = _local.__dict__.setdefault("buffers", {})
    buf = cache.get(cd)
    if buf is None or buf.numel() < numel:
        buf = cache[cd] = torch.empty(numel, dtype=cd)
    return buf[:numel]


class _Scratch:
    """`n` float buffers of one row chunk, reused chunk after chunk (and call after call
    on the CPU, see _workspace)."""

    def __init__(self, rows: int, width: int, cd: torch.dtype, device, n: int):
        self.step = max(1, min(rows, CHUNK // max(width, 1)))
        self.rows = rows
        flat = _workspace(n * self.step * width, cd, torch.device(device))
        self.bufs = list(flat.view(n, self.step, width).unbind(0))

    def chunks(self):
        """(r0, r1, buffers cut to the chunk's rows) for every row chunk."""
        for r0 in range(0, self.rows, self.step):
            r1 = min(self.rows, r0 + self.step)
            yield r0, r1, [b[:r1 - r0] for b in self.bufs]


def _softmax_into(dst: torch.Tensor, l: torch.Tensor, conv: torch.Tensor, wk: torch.Tensor,
                  drop: bool, stats: torch.Tensor | None = None) -> torch.Tensor:
    """dst = softmax(l) over the last dim in dst's dtype (bf16/fp16 converted exactly via
    `conv` first), or exp((l - m) - log s) with given row stats [rows, 2] (l is then a
    slice of the row). A row of weight 0 is dropped from the mixture, so a NaN row there
    (all -inf, NaN or +inf inside: softmax makes the whole row NaN) is set to 0."""
    if l.dtype != dst.dtype:
        l = conv.copy_(l)
    if stats is None:
        _softmax_out(l, -1, False, out=dst)
    else:
        torch.sub(l, stats[:, 0:1], out=dst).sub_(stats[:, 1:2]).exp_()
    if drop:
        dst.masked_fill_((wk == 0) & torch.isnan(dst[:, :1]), 0.0)
    return dst


def _needs_fix(x: torch.Tensor, floor: float) -> bool:
    """True when some element of x may be below floor (one cheap min; NaN: look closer)."""
    lo = float(x.amin())
    return not lo >= floor


def row_stats(x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """Each row's (max m, log sum exp(x - m)) over the last dim, [rows, 2] in cd. NaN in,
    NaN out; an all -inf row gives (-inf, -inf), so its log-probabilities are NaN, as
    log_softmax's."""
    m = x.amax(-1, keepdim=True).to(cd)
    shift = torch.where(m == float("-inf"), 0.0, m)  # -inf - -inf would be NaN
    ls = torch.log(torch.exp(x.to(cd) - shift).sum(-1, keepdim=True))
    return torch.cat([m, ls], -1)


def _log_terms(ls, W, rows, cols, r0, nv, cd, stats=None):
    """Log-domain pieces at the given elements (chunk-relative rows): per model the
    log-softmax lp_k and the weighted term t_k = log w_k + lp_k (-inf where w_k = 0),
    and out = logsumexp_k t_k. Used only for the few elements where q underflows.
    stats: the rows' statistics [R, K, 2] when given (else taken from the rows)."""
    urows, inv = torch.unique(rows, return_inverse=True)
    lps, ts = [], []
    for k, l in enumerate(ls):
        if stats is None:
            st = row_stats(l[r0 + urows, :nv], cd)[inv]
        else:
            st = stats[r0 + rows, k].to(cd)
        lp = (l[r0 + rows, cols].to(cd) - st[:, 0]) - st[:, 1]
        w = W[(r0 + rows) if W.shape[0] > 1 else torch.zeros_like(rows), k]
        ts.append(torch.where(w > 0, torch.log(w) + lp, float("-inf")))
        lps.append(lp)
    out = torch.logsumexp(torch.stack(ts), dim=0)
    return lps, ts, out


def local_stats(ls, n_valid: int | None):
    """Per row and model, (max, sum exp(x - max)) over the columns < n_valid, as [R, 1, K]
    each: one partial logsumexp of the row (NaN in, NaN out; all -inf gives (-inf, 0))."""
    R, V = ls[0].shape
    nv = V if n_valid is None else n_valid
    cd = compute_dtype(ls)
    m = torch.full((R, 1, len(ls)), float("-inf"), dtype=cd, device=ls[0].device)
    s = torch.zeros_like(m)
    if nv == 0:
        return m, s
    scratch = _Scratch(R, nv, cd, ls[0].device, 1)
    for r0, r1, (e,) in scratch.chunks():
        for k, l in enumerate(ls):
            x = l[r0:r1, :nv]
            mk = x.amax(-1, keepdim=True).to(cd)  # exact in any float dtype; NaN wins
            shift = torch.where(mk == float("-inf"), 0.0, mk)  # -inf - -inf would be NaN
            torch.sub(x, shift, out=e).exp_()
            m[r0:r1, 0, k] = mk[:, 0]
            torch.sum(e, -1, out=s[r0:r1, 0, k])
    return m, s


def _zero_weight_models(W: torch.Tensor) -> list[bool]:
    """Per model, whether its weight is 0 in some row (those rows must drop it, NaN and
    all). Off the CPU every model is treated so: asking would synchronise."""
    if W.device.type != "cpu":
        return [True] * W.shape[1]
    lowest = W.tolist() if W.shape[0] <= FEW_ROWS else W.amin(0, keepdim=True).tolist()
    return [any(row[k] == 0 for row in lowest) for k in range(W.shape[1])]


def forward(ls, W: torch.Tensor, n_valid: int | None, stats: torch.Tensor | None = None):
    """out [R, V] and None (nothing saved). stats: each row's statistics per model
    [R, K, 2] (see `row_stats`), when the row extends beyond these columns (a vocabulary
    slice); None: from the rows."""
    R, V = ls[0].shape
    nv = V if n_valid is None else n_valid
    cd = compute_dtype(ls)
    W = W.to(cd)
    drop = _zero_weight_models(W)
    out = torch.empty(R, V, dtype=cd, device=ls[0].device)
    if nv < V:
        out[:, nv:] = float("-inf")
    if nv == 0:
        return out, None
    if stats is None and R <= FEW_ROWS and out.device.type == "cpu":
        _few_rows(ls, W, drop, out[:, :nv])
        _fix_underflow(out[:, :nv], ls, W, 0, nv, None)
        return out, None
    scratch = _Scratch(R, nv, cd, ls[0].device, 3)
    for r0, r1, (q, p, conv) in scratch.chunks():
        w = W[r0:r1] if W.shape[0] > 1 else W
        for k, l in enumerate(ls):
            wk = w[:, k:k + 1]
            lk = None if stats is None else stats[r0:r1, k]
            if k == 0:
                _softmax_into(q, l[r0:r1, :nv], conv, wk, drop[k], lk).mul_(wk)
            else:
                q.addcmul_(_softmax_into(p, l[r0:r1, :nv], conv, wk, drop[k], lk), wk)
        torch.log(q, out=out[r0:r1, :nv])
        _fix_underflow(out[r0:r1, :nv], ls, W, r0, nv, stats)
    return out, None


def _few_rows(ls, W: torch.Tensor, drop: list[bool], out: torch.Tensor) -> None:
    """out = log(sum_k w_k softmax(l_k)) for a few rows (decoding on the CPU), all rows at
    once. ATen's softmax gives each thread whole rows, so fewer rows than threads would
    leave cores idle: then (and for bf16/fp16, which must be widened anyway) the K models'
    rows are stacked and go through ONE softmax; the rest is elementwise."""
    R, nv = out.shape
    p = _workspace(len(ls) * R * nv, out.dtype, out.device).view(len(ls), R, nv)
    xs = [l if l.shape[1] == nv else l[:, :nv] for l in ls]
    if R >= torch.get_num_threads() and all(x.dtype == out.dtype for x in xs):
        for k, x in enumerate(xs):
            _softmax_out(x, -1, False, out=p[k])
    else:
        for k, x in enumerate(xs):
            p[k].copy_(x)
        flat = p.view(-1, nv)
        _softmax_out(flat, -1, False, out=flat)  # in place: each pass reads before it writes
    for k in range(len(ls)):
        if drop[k]:  # a row of weight 0 leaves the model out (a NaN row too)
            p[k].masked_fill_((W[:, k:k + 1] == 0) & torch.isnan(p[k, :, :1]), 0.0)
    if len(ls) == 2 and all(w1 == 1 - w0 for w0, w1 in W.tolist()):  # exactly (floats)
        torch.lerp(p[1], p[0], W[:, :1], out=out)  # w0 p0 + (1 - w0) p1 in one pass
    else:
        torch.mul(p[0], W[:, :1], out=out)
        for k in range(1, len(ls)):
            out.addcmul_(p[k], W[:, k:k + 1])
    torch.log(out, out=out)


def _fix_underflow(o: torch.Tensor, ls, W: torch.Tensor, r0: int, nv: int,
                   stats: torch.Tensor | None) -> None:
    """Where the mixture q underflowed (o = log q below log TINY: a -inf column included),
    recompute o in the log domain. NaN compares False: NaN rows stay NaN."""
    floor = math.log(_tiny(o.dtype))
    if not _needs_fix(o, floor):
        return
    small = o < floor
    if bool(small.any()):
        rows, cols = small.nonzero(as_tuple=True)
        o[rows, cols] = _log_terms(ls, W, rows, cols, r0, nv, o.dtype, stats)[2]


class _Backward:
    """The backward over one set of rows and columns, chunk by chunk. With h = g / q:
    `sums` gives per row d_k = sum_j h_j p_kj and c_k = sum_j g_j r_kj (log-domain terms
    where q underflows), `grads` then writes grad l_k = p_k (w_k h - c_k) (+ g r_k where q
    underflows) for a given c: this chunk's own, or, for a vocabulary slice, the global
    one."""

    def __init__(self, ls, W, g, n_valid, stats):
        R, V = ls[0].shape
        self.ls, self.g, self.stats = ls, g, stats
        self.nv = V if n_valid is None else n_valid
        self.cd = compute_dtype(ls)
        self.W = W.to(self.cd)
        self.drop = (self.W == 0).any(0).tolist()
        self.scratch = _Scratch(R, self.nv, self.cd, ls[0].device, len(ls) + 3)

    def chunks(self):
        """(r0, r1, state of the chunk after its sums: see `sums`) for every row chunk."""
        for r0, r1, bufs in self.scratch.chunks():
            yield r0, r1, self.sums(r0, r1, bufs)

    def sums(self, r0, r1, bufs):
        ls, W, cd, nv, K = self.ls, self.W, self.cd, self.nv, len(self.ls)
        h, t, conv, *ps = bufs
        w = W[r0:r1] if W.shape[0] > 1 else W
        for k, l in enumerate(ls):
            lk = None if self.stats is None else self.stats[r0:r1, k]
            _softmax_into(ps[k], l[r0:r1, :nv], conv, w[:, k:k + 1], self.drop[k], lk)
        q = torch.mul(ps[0], w[:, 0:1], out=h)
        for k in range(1, K):
            q.addcmul_(ps[k], w[:, k:k + 1])
        tiny = _tiny(cd)
        fix = _needs_fix(q, tiny)
        if fix:
            small = q < tiny
            fix = bool(small.any())
        gc = self.g[r0:r1, :nv]
        if gc.dtype != cd:
            gc = conv.copy_(gc)
        h = torch.div(gc, q, out=h)  # h = g / q, in q's buffer
        if fix:  # those elements are summed in the log domain below
            h.masked_fill_(small, 0.0)
        # d_k = sum_j h_j p_kj as a batched dot product (no [rows, V] temporary)
        d = torch.stack([torch.bmm(p.unsqueeze(1), h.unsqueeze(2)).view(-1) for p in ps], 1)
        c = torch.where(w > 0, w * d, 0.0)  # c_k = sum_j g_j r_kj, r_kj = w_k p_kj / q_j
        terms = None
        if fix:
            rows, cols = small.nonzero(as_tuple=True)
            lps, ts, o = _log_terms(ls, W, rows, cols, r0, nv, cd, self.stats)
            gs = gc[rows, cols]
            rs = []
            for k in range(K):
                r = torch.where(ts[k] == float("-inf"), 0.0, torch.exp(ts[k] - o))
                e = torch.where((lps[k] == float("-inf")) | torch.isnan(lps[k]) | (gs == 0),
                                0.0, torch.exp(lps[k] - o))
                d[:, k].index_add_(0, rows, gs * e)
                c[:, k].index_add_(0, rows, gs * r)
                rs.append(gs * r)
            terms = (rows, cols, rs)
        return w, h, t, ps, c, d, terms

    def grads(self, grads, r0, r1, state, c):
        w, h, t, ps, _, _, terms = state
        for k in range(len(ps)):
            # grad l_k = g r_k - p_k c_k = p_k (w_k h - c_k), with g r_k added where q is tiny
            torch.mul(h, w[:, k:k + 1], out=t).sub_(c[:, k:k + 1])
            if terms is not None:
                rows, cols, rs = terms
                t.mul_(ps[k]).index_put_((rows, cols), rs[k], accumulate=True)
                grads[k][r0:r1, :self.nv].copy_(t)
            else:  # the last product goes straight into the gradient (rounded once)
                torch.mul(t, ps[k], out=grads[k][r0:r1, :self.nv])


def _empty_grads(ls, nv: int):
    R, V = ls[0].shape
    grads = [torch.empty(R, V, dtype=l.dtype, device=l.device) for l in ls]
    if nv < V:
        for gr in grads:
            gr[:, nv:] = 0.0
    return grads


def backward(ls, W: torch.Tensor, saved, g: torch.Tensor, n_valid: int | None,
             need_w: bool):
    R, V = ls[0].shape
    bw = _Backward(ls, W, g, n_valid, None)
    grads = _empty_grads(ls, bw.nv)
    gW = torch.zeros(R, len(ls), dtype=bw.cd, device=W.device)
    for r0, r1, state in bw.chunks():
        bw.grads(grads, r0, r1, state, state[4])
        gW[r0:r1] = state[5]
    if not need_w:
        return grads, None
    return grads, (gW if W.shape[0] > 1 else gW.sum(0, keepdim=True))


def backward_sums(ls, W: torch.Tensor, stats: torch.Tensor, g: torch.Tensor,
                  n_valid: int | None):
    """This vocabulary slice's share of c_k = sum_j g_j r_kj and of d_k = sum_j g_j p_kj
    / q_j (= grad w_k), [R, K] each, for rows whose statistics are stats [R, K, 2]."""
    R, _ = ls[0].shape
    bw = _Backward(ls, W, g, n_valid, stats)
    c = torch.zeros(R, len(ls), dtype=bw.cd, device=ls[0].device)
    d = torch.zeros_like(c)
    if bw.nv == 0:
        return c, d
    for r0, r1, state in bw.chunks():
        c[r0:r1], d[r0:r1] = state[4], state[5]
    return c, d


def backward_grads(ls, W: torch.Tensor, stats: torch.Tensor, g: torch.Tensor, c: torch.Tensor,
                   n_valid: int | None):
    """Gradients to each logits slice (in its dtype), given the rows' global c [R, K]."""
    bw = _Backward(ls, W, g, n_valid, stats)
    grads = _empty_grads(ls, bw.nv)
    if bw.nv == 0:
        return grads
    c = c.to(bw.cd)
    for r0, r1, state in bw.chunks():
        bw.grads(grads, r0, r1, state, c[r0:r1])
    return grads
