"""Mixture of K next-token distributions in Triton (docs/design.md 1.2), for any K:

    out_j = log sum_k w_k softmax(x_k)_j = logsumexp_k(log w_k + lp_kj),
    lp_kj = (x_kj - m_k) - log s_k,     m_k = max_j x_kj,   s_k = sum_j exp(x_kj - m_k).

The K logits tensors (bf16, fp16 or fp32 each; rows strided, columns contiguous) reach a
kernel as one tuple `xs` (and their row strides as `x_row_strides`), K is a compile-time
constant: a two-model mix compiles to a two-model kernel, nothing is padded. Per row and
model the kernels keep two numbers, the row statistics (m_k, log s_k) (`stats`, [R, K, 2]
float32), never a softmax. The max is subtracted first, from the logits as they are:
folding it into one logsumexp would round lse_k to float32 (an ulp is 1e-3 at |lse| = 1e4)
and shift every log-probability of a large-logit row by that error.

Forward, two layouts (R rows of V columns, b_k bytes per element of model k):
- many rows (training): `mix_forward_row_kernel`, one program per row: one sweep gives
  every model's (m_k, s_k), a second writes the output, walking the row backwards so the
  blocks read last are still in cache. Moves R * V * (2 * sum_k b_k + 4) bytes (the second
  read mostly from L2).
- few rows (decoding, 1..64 rows of 152K): one program per row cannot fill a GPU, so each
  row is cut into S spans: `mix_partial_stats_kernel` writes each span's partial (m, s),
  `mix_forward_span_kernel` combines a row's S partials on chip and writes its span. Two
  launches, grid sizes from shapes only, no host synchronisation: capturable in a CUDA graph.
  Moves the same bytes (each span's second read from L2).

Backward (g = dL/dout; e_kj = p_kj / q_j, the mixture q = sum_k w_k p_k):
    grad x_k = g * w_k * e_k - p_k * c_k,   c_k = w_k d_k,   d_k = sum_j g_j e_kj = grad w_k
`mix_backward_sums_kernel` writes per-span partial d_k for all K models in one sweep (every
column block of every input read once), `mix_backward_grads_kernel` then writes all K
gradients in one more sweep. Both recompute lp_k and out from the logits and the stats.
Moves R * V * (2 * (4 + sum_k b_k) + sum_k b_k) bytes: g and the logits read twice, the
gradients written once.

The kernels' shared pieces (loading blocks, row statistics, the mixture) are in
mix_blocks.py. Offsets are 64-bit (rows x V passes 2**31 at training sizes). The launchers
below follow the engine interface of modkern/ops/mix_torch.py, including the pieces a
vocabulary split across processes needs (`local_stats`, `forward(..., stats=)`,
`backward_sums`, `backward_grads`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .convert import narrow
from .mix_blocks import (row_starts, span_stats, load_stats, load_weights, share, block_again,
                         write_span, store_stats, combine_partials)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # as triton reads it
# Columns per block: 4096 keeps 16 KB of each fp32 row chunk in registers on a GPU; small
# under the interpreter so CI's small V still walks several blocks and spans.
BLOCK = 1024 if _INTERPRET else 4096
NUM_WARPS = 8
MAX_SPLITS = 256


# ---------------------------------------------------------------- forward kernels


@triton.jit
def mix_forward_row_kernel(xs, x_row_strides, w_ptr, w_row_stride, out_ptr, stats_ptr,
                           n_valid, V, K: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: the row's stats, then its output. Reads 2 * sum_k b_k, writes
    4 bytes per column (plus 8 K bytes of stats per row)."""
    row = tl.program_id(0).to(tl.int64)
    starts = row_starts(xs, x_row_strides, row, K)
    ms, ss = span_stats(starts, n_valid, 0, V, K, BLOCK)
    lss = store_stats(stats_ptr, row, ms, ss, K)
    ws = load_weights(w_ptr, w_row_stride, row, K)
    write_span(starts, out_ptr + row * V, ws, ms, lss, 0, V, n_valid, K, BLOCK)


@triton.jit
def mix_partial_stats_kernel(xs, x_row_strides, part_ptr, n_valid, V, span,
                             K: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, span): the span's partial (m_k, s_k) into part [R, S, K, 2]. Reads
    sum_k b_k per column, writes 8 K bytes."""
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    c0 = sid * span
    starts = row_starts(xs, x_row_strides, row, K)
    ms, ss = span_stats(starts, n_valid, c0, tl.minimum(c0 + span, V), K, BLOCK)
    for k in tl.static_range(K):
        at = ((row * tl.num_programs(1) + sid) * K + k) * 2
        tl.store(part_ptr + at, ms[k])
        tl.store(part_ptr + at + 1, ss[k])


@triton.jit
def mix_forward_span_kernel(xs, x_row_strides, w_ptr, w_row_stride, part_ptr, stats_ptr,
                            out_ptr, n_valid, V, span, K: tl.constexpr,
                            SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, span): combines the row's partials into its stats (stored by span 0)
    and writes the span's output. Reads sum_k b_k and writes 4 bytes per column."""
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    ms, ss = combine_partials(part_ptr, row, tl.num_programs(1), K, SPLITS)
    lss = ()
    for k in tl.static_range(K):
        lss = lss + (tl.log(ss[k]),)
    if sid == 0:
        store_stats(stats_ptr, row, ms, ss, K)
    ws = load_weights(w_ptr, w_row_stride, row, K)
    c0 = sid * span
    write_span(row_starts(xs, x_row_strides, row, K), out_ptr + row * V, ws, ms, lss,
                c0, tl.minimum(c0 + span, V), n_valid, K, BLOCK)


@triton.jit
def mix_forward_given_stats_kernel(xs, x_row_strides, w_ptr, w_row_stride, stats_ptr,
                                   out_ptr, n_valid, V, span, K: tl.constexpr,
                                   BLOCK: tl.constexpr):
    """Program (row, span): a vocabulary slice's output from its rows' stats over the
    whole vocabulary (modkern/ops/mix_parallel.py). Reads sum_k b_k, writes 4 bytes per
    column."""
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * span
    ms, lss = load_stats(stats_ptr, row, K)
    ws = load_weights(w_ptr, w_row_stride, row, K)
    write_span(row_starts(xs, x_row_strides, row, K), out_ptr + row * V, ws, ms, lss,
                c0, tl.minimum(c0 + span, V), n_valid, K, BLOCK)


# ---------------------------------------------------------------- backward kernels


@triton.jit
def mix_backward_sums_kernel(xs, x_row_strides, g_ptr, g_row_stride, w_ptr, w_row_stride,
                             stats_ptr, part_ptr, n_valid, V, span, K: tl.constexpr,
                             BLOCK: tl.constexpr):
    """Program (row, span): the span's partial d_k = sum_j g_j p_kj / q_j of every model,
    into part [R, S, K], in one sweep. Reads 4 + sum_k b_k per column, writes 4 K bytes."""
    row = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1)
    starts = row_starts(xs, x_row_strides, row, K)
    ms, lss = load_stats(stats_ptr, row, K)
    ws = load_weights(w_ptr, w_row_stride, row, K)
    c0 = sid * span
    c1 = tl.minimum(c0 + span, n_valid)
    acc = ()
    for k in tl.static_range(K):
        acc = acc + (tl.zeros([BLOCK], tl.float32),)
    for start in range(c0, c1, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        load = cols < c1
        g, lps, out = block_again(starts, g_ptr + row * g_row_stride, cols, load, ms, lss,
                                   ws, K)
        new = ()
        for k in tl.static_range(K):
            new = new + (acc[k] + tl.where(g == 0, 0.0, g * share(lps[k], out)),)
        acc = new
    for k in tl.static_range(K):
        tl.store(part_ptr + (row * tl.num_programs(1) + sid) * K + k, tl.sum(acc[k], axis=0))


@triton.jit
def mix_backward_grads_kernel(xs, x_row_strides, grads, g_ptr, g_row_stride, w_ptr,
                              w_row_stride, stats_ptr, c_ptr, n_valid, V, span,
                              K: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, span): grad x_k = g w_k e_k - p_k c_k for every model in one sweep
    (0 for a model of weight 0 and beyond n_valid). Reads 4 + sum_k b_k, writes sum_k b_k
    per column."""
    row = tl.program_id(0).to(tl.int64)
    starts = row_starts(xs, x_row_strides, row, K)
    ms, lss = load_stats(stats_ptr, row, K)
    ws = load_weights(w_ptr, w_row_stride, row, K)
    c0 = tl.program_id(1) * span
    c1 = tl.minimum(c0 + span, V)
    for start in range(c0, c1, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        load = cols < n_valid
        g, lps, out = block_again(starts, g_ptr + row * g_row_stride, cols, load, ms, lss,
                                   ws, K)
        for k in tl.static_range(K):
            c_k = tl.load(c_ptr + row * K + k)
            p = tl.where(lps[k] != lps[k], 0.0, tl.exp(lps[k]))
            grad = tl.where(ws[k] > 0, g * ws[k] * share(lps[k], out) - p * c_k, 0.0)
            dst = grads[k] + row * V + cols
            tl.store(dst, narrow(grad, dst.dtype.element_ty), mask=cols < c1)


# ---------------------------------------------------------------- launchers


def _device_programs(device: torch.device) -> int:
    """Programs that fill the device: a few per SM (under the interpreter: a small number,
    so CI exercises the split path)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _spans(R: int, V: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(spans per row, columns per span): `splits` spans when given; else one span per row
    once the rows alone fill the device, or enough spans (whole BLOCKs each) to give every
    SM work."""
    if splits is None:
        want = _device_programs(device)
        if R >= want:
            return 1, max(V, 1)
        splits = min(MAX_SPLITS, triton.cdiv(V, BLOCK), triton.cdiv(want, R))
    span = triton.cdiv(triton.cdiv(V, splits), BLOCK) * BLOCK
    return triton.cdiv(V, span), span


def _inputs(ls) -> dict:
    """The logits as kernel arguments: one tuple of tensors, one of row strides."""
    return {"xs": tuple(ls), "x_row_strides": tuple(t.stride(0) for t in ls)}


def _weights(W: torch.Tensor) -> dict:
    """W [R or 1, K] as kernel arguments (a row stride of 0 broadcasts one row)."""
    W = W.to(torch.float32).contiguous()
    return {"w_ptr": W, "w_row_stride": W.shape[1] if W.shape[0] > 1 else 0}


def _launch_options(K: int) -> dict:
    return {"K": K, "BLOCK": BLOCK, "num_warps": NUM_WARPS}


def _n_valid(V: int, n_valid: int | None) -> int:
    return V if n_valid is None else n_valid


def local_stats(ls, n_valid: int | None, splits: int | None = None):
    """Per row, span and model the partial (max, sum exp(x - max)) over the columns
    < n_valid, [R, S, K] float32 each (a row's stats are their combination)."""
    R, V = ls[0].shape
    n_split, span = _spans(R, V, ls[0].device, splits)
    part = torch.empty(R, n_split, len(ls), 2, dtype=torch.float32, device=ls[0].device)
    mix_partial_stats_kernel[(R, n_split)](**_inputs(ls), part_ptr=part,
                                           n_valid=_n_valid(V, n_valid), V=V, span=span,
                                           **_launch_options(len(ls)))
    return part[..., 0], part[..., 1]


def forward(ls, W: torch.Tensor, n_valid: int | None, splits: int | None = None,
            stats: torch.Tensor | None = None):
    """out [R, V] float32 and the row stats [R, K, 2] (m_k, log s_k), saved for the
    backward. splits: force the number of vocabulary spans per row (None: from the shape).
    stats: the rows' stats when the rows extend beyond these columns (a vocabulary slice)."""
    R, V = ls[0].shape
    K = len(ls)
    dev = ls[0].device
    out = torch.empty(R, V, dtype=torch.float32, device=dev)
    n_split, span = _spans(R, V, dev, splits)
    args = {**_inputs(ls), **_weights(W), "out_ptr": out, "n_valid": _n_valid(V, n_valid),
            "V": V, **_launch_options(K)}
    if stats is not None:
        stats = stats.to(torch.float32).contiguous()
        mix_forward_given_stats_kernel[(R, n_split)](stats_ptr=stats, span=span, **args)
        return out, stats
    stats = torch.empty(R, K, 2, dtype=torch.float32, device=dev)
    if n_split == 1 and splits is None:
        mix_forward_row_kernel[(R,)](stats_ptr=stats, **args)
        return out, stats
    part = torch.empty(R, n_split, K, 2, dtype=torch.float32, device=dev)
    mix_partial_stats_kernel[(R, n_split)](**_inputs(ls), part_ptr=part,
                                           n_valid=args["n_valid"], V=V, span=span,
                                           **_launch_options(K))
    mix_forward_span_kernel[(R, n_split)](part_ptr=part, stats_ptr=stats, span=span,
                                          SPLITS=max(2, triton.next_power_of_2(n_split)),
                                          **args)
    return out, stats


def backward(ls, W: torch.Tensor, stats: torch.Tensor, g: torch.Tensor, n_valid: int | None,
             need_w: bool, splits: int | None = None):
    """Gradients of sum(g * out) to each logits tensor (in its dtype) and to W."""
    g = g if g.stride(-1) == 1 else g.contiguous()  # once, for both kernels (g may be an
    # expanded scalar gradient)
    c, d = backward_sums(ls, W, stats, g, n_valid, splits)
    grads = backward_grads(ls, W, stats, g, c, n_valid, splits)
    if not need_w:
        return grads, None
    gW = d.to(W.dtype)
    return grads, (gW if W.shape[0] > 1 else gW.sum(0, keepdim=True))


def backward_sums(ls, W: torch.Tensor, stats: torch.Tensor, g: torch.Tensor,
                  n_valid: int | None, splits: int | None = None):
    """Per row and model c_k = sum_j g_j w_k p_kj / q_j and d_k = sum_j g_j p_kj / q_j
    (= grad w_k) over these columns, [R, K] float32 each."""
    R, V = ls[0].shape
    K = len(ls)
    g = g if g.stride(-1) == 1 else g.contiguous()
    stats = stats.to(torch.float32).contiguous()
    weights = _weights(W)
    n_split, span = _spans(R, V, ls[0].device, splits)
    part = torch.empty(R, n_split, K, dtype=torch.float32, device=ls[0].device)
    mix_backward_sums_kernel[(R, n_split)](**_inputs(ls), g_ptr=g, g_row_stride=g.stride(0),
                                           **weights, stats_ptr=stats, part_ptr=part,
                                           n_valid=_n_valid(V, n_valid), V=V, span=span,
                                           **_launch_options(K))
    d = part.sum(1)
    Wf = weights["w_ptr"]
    return torch.where(Wf > 0, Wf * d, 0.0), d


def backward_grads(ls, W: torch.Tensor, stats: torch.Tensor, g: torch.Tensor, c: torch.Tensor,
                   n_valid: int | None, splits: int | None = None):
    """Gradients to each logits tensor (in its dtype), given the rows' c [R, K]."""
    R, V = ls[0].shape
    dev = ls[0].device
    g = g if g.stride(-1) == 1 else g.contiguous()
    stats = stats.to(torch.float32).contiguous()
    n_split, span = _spans(R, V, dev, splits)
    grads = tuple(torch.empty(R, V, dtype=l.dtype, device=dev) for l in ls)
    mix_backward_grads_kernel[(R, n_split)](**_inputs(ls), grads=grads, g_ptr=g,
                                            g_row_stride=g.stride(0), **_weights(W),
                                            stats_ptr=stats,
                                            c_ptr=c.to(torch.float32).contiguous(),
                                            n_valid=_n_valid(V, n_valid), V=V, span=span,
                                            **_launch_options(len(ls)))
    return list(grads)
