"""An independent oracle for the MoD weight select (docs/design.md 1.1), written in numpy.

Nothing here imports modkern, and torch is used only to move raw bits in and out: a tensor
is read as its integer bit patterns and every floating-point operation of the formula is
done by numpy. bfloat16 (which numpy lacks) is held in float32 and rounded with integer
arithmetic (round to nearest, ties to even); float16 uses numpy's own IEEE float16.

Two precisions, as in modkern:
- "exact": min, max and `(x - mn) / (mx - mn)` in float32 (float64 for float64 input),
  each operation rounded to nearest; alpha rounded to float32.
- "reference": the released code's arithmetic in the tensor's own dtype. torch evaluates a
  bf16/fp16 operation in float32 and rounds the result to bf16/fp16 (for +, - and / that
  is the correctly rounded result: float32 has more than 2p + 2 bits), and converts a Python
  float such as alpha to bf16/fp16 through float32 (double rounding), so `t < 0.9` compares
  with bf16(0.9) = 0.8984375.

Converting t2 to t1's dtype follows torch's `.to()`: through float32 for bf16/fp16 targets.
"""

from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
SHORT_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
              torch.float64: "fp64"}
_BITS = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32),
         8: (torch.int64, np.uint64)}


# --- bits in and out of torch -------------------------------------------------------------

def bits_of(t: torch.Tensor) -> np.ndarray:
    """The raw bit patterns of a float tensor, flattened in row-major order (unsigned)."""
    itype, utype = _BITS[t.element_size()]
    flat = t.detach().cpu().reshape(-1).contiguous()
    return flat.view(itype).numpy().view(utype).copy()


def tensor_from_bits(bits: np.ndarray, dtype: torch.dtype, shape) -> torch.Tensor:
    """A CPU tensor of `dtype` and `shape` holding the given bit patterns."""
    _, utype = _BITS[torch.empty((), dtype=dtype).element_size()]
    signed = np.dtype(utype).str.replace("u", "i")  # same width, signed: torch has no uint16
    b = np.ascontiguousarray(bits.astype(utype)).view(signed).copy()
    return torch.from_numpy(b).view(dtype).reshape(shape)


def values_of(t: torch.Tensor) -> np.ndarray:
    """t's values, exactly, as float32 (bf16, fp16, fp32) or float64 (fp64)."""
    bits = bits_of(t)
    if t.dtype == torch.bfloat16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if t.dtype == torch.float16:
        return bits.view(np.float16).astype(np.float32)
    if t.dtype == torch.float32:
        return bits.view(np.float32)
    return bits.view(np.float64)


def bits_from_values(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Bit patterns of `dtype` for values already representable in it (no rounding)."""
    if dtype == torch.bfloat16:
        return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if dtype == torch.float16:
        return np.asarray(x, np.float32).astype(np.float16).view(np.uint16)
    if dtype == torch.float32:
        return np.asarray(x, np.float32).view(np.uint32)
    return np.asarray(x, np.float64).view(np.uint64)


# --- rounding -----------------------------------------------------------------------------

def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32. Integer arithmetic
    only; overflow gives +-inf, NaN stays NaN."""
    x = np.asarray(x, np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out)


def round_to(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round float32 values (or float64 for fp64) to `dtype`, held in the carrier dtype."""
    if dtype == torch.bfloat16:
        return round_bf16(x)
    if dtype == torch.float16:
        with np.errstate(over="ignore"):
            return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    if dtype == torch.float32:
        return np.asarray(x, np.float32)
    return np.asarray(x, np.float64)


def convert_like_torch(x64: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values -> `dtype` the way torch's `.to()` (and a Python float scalar) does:
    directly for fp32/fp64, through float32 for bf16/fp16 (carrier dtype returned)."""
    x64 = np.asarray(x64, np.float64)
    if dtype == torch.float64:
        return x64
    with np.errstate(over="ignore"):
        return round_to(x64.astype(np.float32), dtype)


def carrier(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


# --- the formula --------------------------------------------------------------------------

def alpha_seen(alpha: float, dtype: torch.dtype, precision: str) -> np.ndarray:
    """alpha as the comparison sees it: float32 ("exact"), or t1's dtype ("reference")."""
    if precision == "exact":
        return np.asarray(np.float32(alpha), carrier(dtype))
    return convert_like_torch(np.float64(alpha), dtype)


def takes_t2(x: np.ndarray, mn, mx, alpha: float, dtype: torch.dtype,
             precision: str = "exact") -> np.ndarray:
    """Where the formula takes t2's element, for values x of a tensor of `dtype` whose min
    and max are mn and mx (all given exactly, in the carrier dtype)."""
    norm = normalized(x, mn, mx, dtype, precision)
    return ~(norm < alpha_seen(alpha, dtype, precision))


def normalized(x: np.ndarray, mn, mx, dtype: torch.dtype, precision: str = "exact"
               ) -> np.ndarray:
    """`(x - mn) / (mx - mn)` as the formula computes it (0 everywhere if mx == mn)."""
    cd = carrier(dtype)
    x, mn, mx = np.asarray(x, cd), cd(mn), cd(mx)
    if mx == mn:
        return np.zeros_like(x)
    rnd = (lambda v: v) if precision == "exact" else (lambda v: round_to(v, dtype))
    with np.errstate(over="ignore", invalid="ignore"):
        return rnd(rnd(x - mn) / rnd(mx - mn))


def take_mask(t1: torch.Tensor, alpha: float, precision: str = "exact") -> np.ndarray:
    """Flat boolean mask: True where the select takes t2 (row-major order)."""
    x = values_of(t1)
    if x.size == 0:
        return np.zeros(0, bool)
    return takes_t2(x, x.min(), x.max(), alpha, t1.dtype, precision)


def cast_bits(t2: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """t2's flat bit patterns after conversion to `dtype` (torch's `.to()` rounding)."""
    if t2.dtype == dtype:
        return bits_of(t2)
    return bits_from_values(convert_like_torch(values_of(t2).astype(np.float64), dtype), dtype)


def oracle_select(t1: torch.Tensor, t2: torch.Tensor, alpha: float,
                  precision: str = "exact") -> torch.Tensor:
    """The select of docs/design.md 1.1 as a new CPU tensor of t1's dtype and shape."""
    take = take_mask(t1, alpha, precision)
    bits = np.where(take, cast_bits(t2, t1.dtype), bits_of(t1)) if take.size else bits_of(t1)
    return tensor_from_bits(bits, t1.dtype, t1.shape)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-for-bit equality (so -0.0 != +0.0), with the first differing elements shown."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = bits_of(actual), bits_of(expected)
    bad = np.nonzero(a != e)[0]
    if bad.size:
        va, ve = values_of(actual), values_of(expected)
        shown = ", ".join(f"[{i}] {va[i]!r} (bits {a[i]:#x}) != {ve[i]!r} (bits {e[i]:#x})"
                          for i in bad[:5])
        raise AssertionError(f"{what}: {bad.size} of {a.size} elements differ: {shown}")


# --- enumerating representable values -----------------------------------------------------

def all_values_between(lo: float, hi: float, dtype: torch.dtype) -> np.ndarray:
    """Every value of the 16-bit `dtype` in [lo, hi] (lo, hi representable), ascending, as
    float32, including -0.0 next to +0.0 when 0 is in range."""
    assert dtype in (torch.bfloat16, torch.float16)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    vals = (every.astype(np.uint32) << 16).view(np.float32) if dtype == torch.bfloat16 \
        else every.view(np.float16).astype(np.float32)
    vals = vals[~np.isnan(vals)]
    inside = vals[(vals >= np.float32(lo)) & (vals <= np.float32(hi))]
    return np.sort(inside, kind="stable")  # -0.0 and +0.0 are equal: either order
