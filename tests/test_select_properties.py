"""Hypothesis properties of the MoD weight select, on every backend, against the oracle.

Tensors are drawn from a small pool of values (so ties at the min, the max and on the
normalized grid are common) mixed with arbitrary floats, -0.0 and subnormals, in every float
dtype; alphas from the special values (0, 1, 1e-7, 0.9, bf16(0.9)) and anywhere in [0, 1].
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import modkern
from oracle_select import (FLOAT_DTYPES, assert_bits_equal, bits_of, cast_bits, oracle_select,
                           take_mask, values_of)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
MARK = 1000.0  # a t2 value no drawn t1 holds: where it shows, t2 was taken

POOL = [-4.0, -1.0, -0.5, -0.0, 0.0, 0.25, 0.5, 1.0, 3.0, 4.0, 1e-40, -1e-40, 2.0**-20]
values = st.one_of(st.sampled_from(POOL),
                   st.floats(-4, 4, allow_nan=False, allow_subnormal=True))
alphas = st.one_of(st.sampled_from([0.0, 1.0, 1e-7, 0.5, 0.9, 0.8984375, 1 - 2**-24]),
                   st.floats(0, 1))
dtypes = st.sampled_from(FLOAT_DTYPES)
precisions = st.sampled_from(["exact", "reference"])


@st.composite
def tensors(draw, min_size=0, max_size=48):
    dtype = draw(dtypes)
    xs = draw(st.lists(values, min_size=min_size, max_size=max_size))
    t = torch.tensor(xs, dtype=torch.float64).to(dtype)
    if draw(st.booleans()) and t.numel() % 2 == 0 and t.numel():
        t = t.reshape(2, -1).t()  # a non-contiguous view now and then
    return t.to(DEVICE)


def other(t1: torch.Tensor, draw_dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t1.shape, generator=g, dtype=torch.float64) * 10).to(draw_dtype) \
        .to(t1.device)


def taken(out: torch.Tensor) -> np.ndarray:
    return values_of(out) == MARK


@pytest.mark.parametrize("backend", BACKENDS)
@given(t1=tensors(), alpha=alphas, precision=precisions, d2=dtypes, seed=st.integers(0, 99))
def test_every_element_comes_from_t1_or_t2(backend, t1, alpha, precision, d2, seed):
    t2 = other(t1, d2, seed)
    out = modkern.mod_select(t1, t2, alpha, backend=backend, precision=precision)
    assert out.dtype == t1.dtype and out.shape == t1.shape
    b = bits_of(out)
    from_t1, from_t2 = b == bits_of(t1), b == cast_bits(t2, t1.dtype)
    assert np.all(from_t1 | from_t2)
    assert_bits_equal(out, oracle_select(t1, t2, alpha, precision), "oracle")
    work = t1.clone()
    modkern.mod_select_(work, t2, alpha, backend=backend, precision=precision)
    assert_bits_equal(work, out, "in place == out of place")


@pytest.mark.parametrize("backend", BACKENDS)
@given(t1=tensors(), precision=precisions, d2=dtypes, seed=st.integers(0, 99))
def test_alpha_zero_takes_all_of_t2(backend, t1, precision, d2, seed):
    t2 = other(t1, d2, seed)  # constant or not, norm < 0 never holds
    out = modkern.mod_select(t1, t2, 0.0, backend=backend, precision=precision)
    assert_bits_equal(out, t2.to(t1.dtype), "alpha 0")


@pytest.mark.parametrize("backend", BACKENDS)
@given(t1=tensors(min_size=1), alpha=alphas, precision=precisions)
def test_maximum_comes_from_t2_unless_constant(backend, t1, alpha, precision):
    t2 = torch.full_like(t1, MARK)
    out = modkern.mod_select(t1, t2, alpha, backend=backend, precision=precision)
    x = values_of(t1)
    if x.max() == x.min():  # constant: norm is 0, t1 kept unless alpha (rounded) is 0
        assert taken(out).all() or not taken(out).any()
        assert_bits_equal(out, oracle_select(t1, t2, alpha, precision), "constant")
    else:
        assert taken(out)[x == x.max()].all()


@pytest.mark.parametrize("backend", BACKENDS)
@given(t1=tensors(min_size=1), a=alphas, b=alphas, precision=precisions)
def test_monotone_in_alpha_and_in_t1(backend, t1, a, b, precision):
    lo, hi = min(a, b), max(a, b)
    t2 = torch.full_like(t1, MARK)
    take_lo = taken(modkern.mod_select(t1, t2, lo, backend=backend, precision=precision))
    take_hi = taken(modkern.mod_select(t1, t2, hi, backend=backend, precision=precision))
    assert np.all(take_lo | ~take_hi)  # the set taken from t2 shrinks as alpha grows
    # at one alpha the taken set is every value from a threshold up
    x = values_of(t1)
    if take_hi.any():
        assert np.all(take_hi[x >= x[take_hi].min()])


@given(t1=tensors(min_size=1), alpha=alphas,
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_exact_and_reference_differ_only_where_the_oracle_says(t1, alpha, dtype):
    t1 = t1.to(dtype)
    t2 = torch.full_like(t1, MARK)
    exact = taken(modkern.mod_select(t1, t2, alpha, precision="exact"))
    ref = taken(modkern.mod_select(t1, t2, alpha, precision="reference"))
    np.testing.assert_array_equal(exact != ref, take_mask(t1, alpha, "exact")
                                  != take_mask(t1, alpha, "reference"))


@given(t1=tensors(min_size=1), alpha=alphas, precision=precisions)
def test_select_threshold_splits_like_the_formula(t1, alpha, precision):
    x = values_of(t1)
    mn, mx = t1.min().cpu(), t1.max().cpu()
    v = values_of(modkern.select_threshold(mn, mx, alpha, precision))[0]
    np.testing.assert_array_equal(x >= v, take_mask(t1, alpha, precision))
