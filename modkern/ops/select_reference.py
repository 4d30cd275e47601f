"""MoD weight select: the specification (docs/design.md 1.1), in plain torch.

`mod_select_reference` is the formula written out as the paper's released code wrote it,
evaluated at a chosen precision. It is slow and simple on purpose: every fast path is tested
against it.

`select_threshold` is the fact every fast path rests on. The normalized value
`(x - mn) / (mx - mn)` is a non-decreasing function of x (a rounded subtraction and a rounded
division by a positive constant are both monotone), so `norm(x) < alpha` holds exactly for the
x below one value v. Searching the representable values between mn and mx for the smallest
one that takes t2 gives that v exactly, and the select becomes `where(t1 < v, t1, t2)`: no
per-element division, and blocks whose maximum is below v need nothing from t2.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """The dtype the normalization is computed in.

    "exact": float32 (float64 for float64 input). "reference": the tensor's own dtype, as
    the released code computed it (torch rounds after every bf16/fp16 operation)."""
    if precision == "reference":
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_tensor(alpha: float | torch.Tensor, dtype: torch.dtype, precision: str,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """alpha as the comparison sees it, held in the compute dtype.

    "exact" rounds alpha to float32 (for float64 input too); "reference" rounds it to the
    tensor's dtype, as `t < 0.9` does in torch (bf16: 0.8984375)."""
    rounded = torch.float32 if precision == "exact" else dtype
    a = torch.as_tensor(alpha, dtype=torch.float64, device=device).to(rounded)
    return a.to(compute_dtype(dtype, precision))


def normalized(x: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor,
               precision: str) -> torch.Tensor:
    """`(x - mn) / (mx - mn)` in the compute dtype; 0 where mx == mn (a constant tensor)."""
    cd = compute_dtype(x.dtype, precision)
    x, mn, mx = x.to(cd), mn.to(cd), mx.to(cd)
    span = mx - mn
    norm = (x - mn) / span
    return torch.where(span == 0, torch.zeros_like(norm), norm)


def mod_select_reference(t1: torch.Tensor, t2: torch.Tensor, alpha: float,
                         precision: str = "exact") -> torch.Tensor:
    """The MoD select of docs/design.md 1.1, element by element: keep t1 where its min-max
    normalized value is below alpha, take t2 elsewhere. Returns a new tensor of t1's dtype."""
    if t1.numel() == 0:
        return t1.clone()
    mn, mx = t1.min(), t1.max()
    keep = normalized(t1, mn, mx, precision) < alpha_tensor(alpha, t1.dtype, precision,
                                                           t1.device)
    return torch.where(keep, t1, t2.to(t1.dtype))


# --- the threshold -----------------------------------------------------------------------

INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width int views


def to_ordered(x: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 so that the integer order is the float order (-0 and +0 meet)."""
    width = x.element_size() * 8
    bits = x.view(INT_OF_SIZE[x.element_size()]).to(torch.int64)
    int_min = -(1 << (width - 1))
    return torch.where(bits >= 0, bits, int_min - bits)


def _from_ordered(o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `to_ordered`."""
    size = dtype.itemsize
    int_min = -(1 << (size * 8 - 1))
    bits = torch.where(o >= 0, o, int_min - o)
    return bits.to(INT_OF_SIZE[size]).view(dtype)


def _answer_near_estimate(lo, hi, mn, mx, a, takes_t2, reach: int = 16):
    """Look for the answer among the 2 * reach + 2 representable values around the float64
    estimate mn + a * (mx - mn), all evaluated at once: where the window provably holds it
    (takes_t2 false at the window's first value, or that value is lo, and true further on)
    return [answer, answer]; elsewhere keep [lo, hi]. Exact either way; usually no
    bisection step is left, so the search costs one vectorized evaluation."""
    dtype = mn.dtype
    estimate = mn.double() + a.double() * (mx.double() - mn.double())
    guess = to_ordered(estimate.to(dtype))
    steps = torch.arange(-reach - 1, reach + 1, device=mn.device)
    window = torch.minimum(torch.maximum(guess[..., None] + steps, lo[..., None]),
                           hi[..., None])  # ascending, clamped to [lo, hi]
    take = takes_t2(_from_ordered(window, dtype), mn[..., None], mx[..., None], a[..., None])
    first = take.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first True, if any
    answer = window.gather(-1, first).squeeze(-1)
    found = take.any(dim=-1) & (~take[..., 0] | (window[..., 0] == lo))
    return torch.where(found, answer, lo), torch.where(found, answer, hi)


def select_threshold(mn: torch.Tensor, mx: torch.Tensor, alpha: float | torch.Tensor,
                     precision: str = "exact") -> torch.Tensor:
    """The value v of t1's dtype with `norm(x) < alpha  <=>  x < v` for every x in [mn, mx].

    mn, mx: the (finite) minimum and maximum of t1, in t1's dtype, one per tensor (any
    shape, e.g. [K] for K tensors at once); alpha a float or a tensor broadcast with them.
    The result is exact: the formula itself evaluated on representable values of t1's
    dtype between mn and mx, first on a window around a float64 estimate, then (where
    the window does not settle it) by binary search. v = +inf means "keep all
    of t1" (a constant tensor with alpha > 0); v = mn means "take all of t2"."""
    dtype = mn.dtype
    a = alpha_tensor(alpha, dtype, precision, mn.device)

    def takes_t2(x: torch.Tensor, mn=mn, mx=mx, a=a) -> torch.Tensor:
        return ~(normalized(x, mn, mx, precision) < a)

    lo, hi = to_ordered(mn), to_ordered(mx)
    lo, hi = torch.broadcast_tensors(lo, hi)
    # Invariant: the answer lies in [lo, hi]; takes_t2(mx) holds whenever mx > mn and
    # alpha <= 1 (norm(mx) is exactly 1), so hi starts as a valid answer.
    lo, hi = _answer_near_estimate(lo, hi, mn, mx, a, takes_t2)
    while bool((lo < hi).any()):  # at most one step per bit of the dtype
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        go_low = takes_t2(_from_ordered(mid, dtype))
        hi = torch.where(go_low, mid, hi)
        lo = torch.where(go_low, lo, torch.minimum(mid + 1, hi))
    v = _from_ordered(hi, dtype)
    # Constant tensors: norm is 0 everywhere, so everything is kept unless alpha <= 0.
    constant = mn == mx
    keep_all = torch.full_like(v, float("inf"))
    v = torch.where(constant & (a > 0), keep_all, v)
    return v
