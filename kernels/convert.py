"""Float conversions for the Triton kernels, exact on GPUs and under the CPU interpreter.

Written out rather than left to `.to()`: Triton's CPU interpreter (which CI runs every
kernel under) turns bf16 subnormals into other numbers in both directions, truncates
float32 -> bf16 instead of rounding it, and casts float64 -> bf16 to garbage. The bit
arithmetic below is what a GPU does anyway, and `convert_like_torch` rounds as torch's
`.to()` does, so the kernels and the torch backend agree bit for bit.
"""

import triton
import triton.language as tl


@triton.jit
def widen(x, ACC: tl.constexpr):
    """x (any float dtype) as ACC (float32 or float64); exact when x is narrower."""
    if x.dtype == tl.bfloat16:  # bf16 is the top half of a float32
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(ACC)


@triton.jit
def narrow(y, DST: tl.constexpr):
    """float32 y (float64 for a float64 DST) rounded to DST: to nearest, ties to even."""
    if DST == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # a NaN stays a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(DST)


@triton.jit
def convert_like_torch(y, DST: tl.constexpr):
    """y of any float dtype -> DST as torch's `.to()` does it: through float32 unless DST
    is float64 (so float64 -> bf16/fp16 rounds twice, exactly like torch)."""
    if DST == tl.float64:
        return widen(y, tl.float64)
    return narrow(widen(y, tl.float32), DST)
