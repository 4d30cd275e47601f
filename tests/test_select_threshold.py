"""The exact threshold: `norm(x) < alpha  <=>  x < select_threshold(mn, mx, alpha)`.

For bf16 and fp16 this is proved by enumeration: every representable value between a
tensor's min and max is checked against the oracle's formula (tests/oracle_select.py), for
many (min, max, alpha) triples. For fp32 and fp64 the boundary (v and the value just below
it) and random samples are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import settings

from modkern import select_threshold
from oracle_select import (all_values_between, bits_from_values, carrier, normalized, round_to,
                           takes_t2, tensor_from_bits, values_of)

PRECISIONS = ("exact", "reference")
SPECIAL_ALPHAS = (0.0, 1.0, 1e-7, 0.1, 0.5, 0.9, 0.999, 1 - 2**-30, 2**-126)
# how many random ranges: scaled with the hypothesis profile (HYPOTHESIS_PROFILE=thorough)
SCALE = max(1, settings.default.max_examples // 40)


def scalar(value, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor of `dtype` holding `value` (representable in it), built from bits."""
    return tensor_from_bits(bits_from_values(np.asarray(value, carrier(dtype)), dtype), dtype, ())


def threshold(mn, mx, alpha, dtype, precision) -> float:
    v = select_threshold(scalar(mn, dtype), scalar(mx, dtype), alpha, precision)
    assert v.dtype == dtype and v.shape == ()
    return values_of(v)[0]


def thresholds(triples, dtype, precision) -> np.ndarray:
    """select_threshold for many (mn, mx, alpha) at once (its batched form: one search)."""
    mn = torch.stack([scalar(t[0], dtype) for t in triples])
    mx = torch.stack([scalar(t[1], dtype) for t in triples])
    alpha = torch.tensor([t[2] for t in triples], dtype=torch.float64)
    v = select_threshold(mn, mx, alpha, precision)
    assert v.dtype == dtype and v.shape == (len(triples),)
    return values_of(v)


def finite_values(dtype: torch.dtype) -> np.ndarray:
    big = {torch.bfloat16: 3.3895e38, torch.float16: 65504.0}[dtype]
    return all_values_between(-big, big, dtype)


def alphas_on_grid(rng, vals, mn, mx, dtype, precision, count=3) -> list[float]:
    """alphas that land exactly on a normalized value of the tensor (and just beside it)."""
    out = []
    for x in rng.choice(vals, size=min(count, vals.size), replace=False):
        norm = float(normalized(np.asarray([x]), mn, mx, dtype, precision)[0])
        if np.isfinite(norm) and 0.0 <= norm <= 1.0:
            f = np.float32(norm)
            out += [norm, float(np.nextafter(f, np.float32(-1))),
                    min(1.0, float(np.nextafter(f, np.float32(2))))]
    return out


def triples_16bit(dtype: torch.dtype, precision: str, seed: int):
    """(mn, mx, alpha) triples: hand-picked ranges (signs, denormals, overflowing spans,
    constant tensors, two-value tensors) and random ones, each with special alphas and
    alphas on a normalized value."""
    rng = np.random.default_rng(seed)
    allv = finite_values(dtype)
    tiny = allv[allv > 0][:3]  # the smallest denormals
    ranges = [(0.0, 1.0), (-1.0, 1.0), (1.0, 1.0), (-0.0, 0.0), (0.0, 0.0), (-2.5, -2.5),
              (1.0, float(allv[np.searchsorted(allv, 1.0) + 1])),  # two adjacent values
              (-3.0, 0.001), (100.0, 300.0), (float(allv[0]), float(allv[-1])),  # span overflows
              (float(-tiny[2]), float(tiny[2])), (0.0, float(tiny[0])),
              (-0.02, 0.02), (float(allv[0]), 0.0)]
    for _ in range(48 * SCALE):
        a, b = np.sort(rng.choice(allv, size=2))
        ranges.append((float(a), float(b)))
    for _ in range(16 * SCALE):  # narrow ranges: few values, many ties of the normalized value
        i = rng.integers(0, allv.size - 40)
        ranges.append((float(allv[i]), float(allv[i + rng.integers(1, 40)])))
    for mn, mx in ranges:
        mn, mx = (float(round_to(np.float32(e), dtype)) for e in (mn, mx))  # representable
        vals = all_values_between(mn, mx, dtype)
        alphas = list(SPECIAL_ALPHAS) + list(rng.uniform(0, 1, 2))
        alphas += alphas_on_grid(rng, vals, mn, mx, dtype, precision)
        for alpha in alphas:
            yield mn, mx, float(alpha), vals


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_threshold_exhaustive_16bit(dtype, precision):
    checked = 0
    triples = list(triples_16bit(dtype, precision, seed=1 + (dtype == torch.float16)))
    for (mn, mx, alpha, vals), v in zip(triples, thresholds(triples, dtype, precision)):
        take = takes_t2(vals, mn, mx, alpha, dtype, precision)
        # the single-threshold structure itself: once t2 is taken, it stays taken
        assert np.all(np.diff(take.astype(np.int8)) >= 0), (mn, mx, alpha)
        below = vals < v
        bad = np.nonzero(below == take)[0]
        assert bad.size == 0, (f"{dtype} {precision} mn={mn!r} mx={mx!r} alpha={alpha!r}: "
                               f"v={v!r} disagrees with the formula at {vals[bad[:5]]}")
        checked += vals.size
    assert checked > 2_000_000  # really exhaustive over wide ranges


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_threshold_batched_equals_one_by_one(dtype, precision):
    rng = np.random.default_rng(7)
    allv = finite_values(dtype)
    pairs = np.sort(rng.choice(allv, size=(64, 2)), axis=1)
    pairs[:4] = [[1.0, 1.0], [0.0, 1.0], [-1.0, 1.0], [3.0, 3.0]]
    alphas = rng.choice([0.0, 1.0, 0.5, 0.9, 1e-7, 0.3], size=64)
    mn = torch.stack([scalar(p[0], dtype) for p in pairs])
    mx = torch.stack([scalar(p[1], dtype) for p in pairs])
    v = select_threshold(mn, mx, torch.tensor(alphas, dtype=torch.float64), precision)
    expected = [threshold(p[0], p[1], a, dtype, precision) for p, a in zip(pairs, alphas)]
    np.testing.assert_array_equal(values_of(v), np.asarray(expected, np.float32))


def random_bits_in(rng, mn, mx, dtype, count):
    """Random values of `dtype` in [mn, mx] drawn uniformly over bit patterns (so every
    binade, denormals included, is sampled), plus uniform real values."""
    cd = carrier(dtype)
    width = np.dtype(cd).itemsize * 8
    ut = np.uint64 if width == 64 else np.uint32
    raw = rng.integers(0, np.iinfo(ut).max, size=count * 4, dtype=ut, endpoint=True).view(cd)
    raw = raw[np.isfinite(raw) & (raw >= cd(mn)) & (raw <= cd(mx))][:count]
    with np.errstate(over="ignore"):
        uni = rng.uniform(float(mn), float(mx), count) if np.isfinite(cd(mx) - cd(mn)) \
            else rng.uniform(float(mn) / 2, float(mx) / 2, count) * 2
    return np.concatenate([raw, np.clip(uni.astype(cd), cd(mn), cd(mx))])


def neighbours(v, mn, mx, cd, k=4):
    """v and the k representable values on each side of it, inside [mn, mx]."""
    out = [cd(v)]
    lo = hi = cd(v)
    with np.errstate(over="ignore"):
        for _ in range(k):
            lo, hi = np.nextafter(lo, cd(-np.inf)), np.nextafter(hi, cd(np.inf))
            out += [lo, hi]
    out = np.asarray(out, cd)
    return out[np.isfinite(out) & (out >= cd(mn)) & (out <= cd(mx))]


def wide_triples(dtype: torch.dtype, rng):
    cd = carrier(dtype)
    fi = np.finfo(cd)
    sub = fi.smallest_subnormal
    ranges = [(0.0, 1.0), (-1.0, 1.0), (2.0, 2.0), (-0.0, 0.0), (0.0, float(sub)),
              (float(-3 * sub), float(5 * sub)), (-float(fi.max), float(fi.max)),
              (-0.02, 0.02), (1.0, float(np.nextafter(cd(1), cd(2)))), (-7.0, -3.0),
              (float(fi.tiny) / 3, float(fi.tiny) * 3)]
    for _ in range(40 * SCALE):
        a, b = np.sort(random_bits_in(rng, -fi.max, fi.max, dtype, 2)[:2])
        ranges.append((float(a), float(b)))
    for _ in range(20 * SCALE):
        a, b = np.sort(rng.normal(0, 0.02, 2))
        ranges.append((float(cd(a)), float(cd(b))))
    for mn, mx in ranges:
        for alpha in list(SPECIAL_ALPHAS) + list(rng.uniform(0, 1, 3)):
            yield cd(mn), cd(mx), float(alpha)
        for x in random_bits_in(rng, mn, mx, dtype, 2)[:2]:  # alpha on a normalized value
            if mx > mn:
                with np.errstate(all="ignore"):
                    norm = float((cd(x) - cd(mn)) / (cd(mx) - cd(mn)))
                if 0.0 <= norm <= 1.0:
                    yield cd(mn), cd(mx), norm


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_threshold_boundary_wide(dtype, precision):
    rng = np.random.default_rng(11 + (dtype == torch.float64))
    cd = carrier(dtype)
    triples = list(wide_triples(dtype, rng))
    for (mn, mx, alpha), v in zip(triples, thresholds(triples, dtype, precision)):
        where = f"{dtype} {precision} mn={mn!r} mx={mx!r} alpha={alpha!r} v={v!r}"
        if mx == mn:
            assert v == (np.inf if alpha_is_positive(alpha, dtype, precision) else mn), where
            continue
        assert mn <= v <= mx, where
        # the boundary: v takes t2, the value just below it keeps t1 (if it is in range)
        assert takes_t2(np.asarray([v], cd), mn, mx, alpha, dtype, precision)[0], where
        with np.errstate(over="ignore"):
            below = np.nextafter(cd(v), cd(-np.inf))
        if below >= mn:
            assert not takes_t2(np.asarray([below], cd), mn, mx, alpha, dtype, precision)[0], where
        samples = np.concatenate([neighbours(v, mn, mx, cd), neighbours(mn, mn, mx, cd),
                                  neighbours(mx, mn, mx, cd),
                                  random_bits_in(rng, mn, mx, dtype, 64)])
        take = takes_t2(samples, mn, mx, alpha, dtype, precision)
        bad = np.nonzero((samples < v) == take)[0]
        assert bad.size == 0, f"{where}: disagrees with the formula at {samples[bad[:5]]}"


def alpha_is_positive(alpha, dtype, precision) -> bool:
    if precision == "exact" or dtype == torch.float32:
        return np.float32(alpha) > 0
    return alpha > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_threshold_constant_tensor(dtype):
    # norm is 0 everywhere: alpha > 0 keeps all of t1 (v = +inf), alpha 0 takes all of t2
    assert threshold(1.5, 1.5, 0.5, dtype, "exact") == np.inf
    assert threshold(1.5, 1.5, 1e-7, dtype, "exact") == np.inf
    assert threshold(1.5, 1.5, 0.0, dtype, "exact") == 1.5
    # alpha 1e-30 is 0 in bf16/fp16 reference arithmetic only for fp16 (bf16 holds it)
    v = threshold(1.5, 1.5, 1e-30, dtype, "reference")
    positive = dtype != torch.float16
    assert v == (np.inf if positive else 1.5)


def test_bf16_alpha_rounds_through_float32():
    # torch turns a Python float into bf16 through float32: just above the midpoint of two
    # bf16 values, float32 rounds onto the midpoint and then ties go to even (down).
    mid = 0.900390625  # between bf16 0.8984375 (even) and 0.90234375
    alpha = mid + 2**-40
    v = threshold(0.0, 1.0, alpha, torch.bfloat16, "reference")
    assert v == np.float32(0.8984375)  # 0.8984375 < bf16(alpha) = 0.8984375 is false
