"""Every backend, out of place, into `out=` and in place, bit for bit against the independent
numpy oracle (tests/oracle_select.py), and modkern's own torch reference against it too.

Covers both precisions, bf16/fp16/fp32/fp64, ties at min and max, alphas that land exactly
on a normalized value, constant tensors, denormals, negative zero, empty and 1-element
tensors, sizes around the Triton block (4096) and the torch path's block group, non-contiguous views, and
t2 of another float dtype than t1.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import modkern
from oracle_select import (FLOAT_DTYPES, SHORT_NAME, assert_bits_equal, normalized,
                           oracle_select, take_mask, values_of)

PRECISIONS = ("exact", "reference")
ALPHAS = (0.0, 1e-7, 0.5, 0.9, 1.0)
BLOCK = 4096  # the Triton kernels' block size (kernels/mod_select.py)
dtype_ids = [SHORT_NAME[d] for d in FLOAT_DTYPES]


def make_t1(kind: str, shape, dtype, rng) -> torch.Tensor:
    """Test tensors of several kinds, generated in float64 and rounded to `dtype`."""
    n = int(np.prod(shape))
    if kind == "normal":  # weights-like, with several elements tied at the min and the max
        x = rng.normal(0, 0.02, n)
        if n >= 8:
            x[rng.choice(n, 3, replace=False)] = x.min() - 0.01
            x[rng.choice(n, 3, replace=False)] = x.max() + 0.01
    elif kind == "grid":  # few distinct values: normalized values k/6, many ties
        x = rng.integers(-3, 4, n).astype(np.float64)
        x[:2] = [-3, 3]
    elif kind == "denormal":  # a range made of subnormal numbers of the dtype
        tiny = float(torch.finfo(dtype).smallest_normal)
        x = rng.integers(-40, 41, n) * (tiny / 64)
    elif kind == "negzero":  # -0.0 and +0.0 mixed with a few values (bits must survive)
        x = rng.choice([-0.0, 0.0, -0.0, 0.5, -0.25], n)
    elif kind == "constant":
        x = np.full(n, -1.25)
    else:
        raise ValueError(kind)
    return torch.from_numpy(x.reshape(shape)).to(dtype)


def make_t2(shape, dtype, rng) -> torch.Tensor:
    """t2 with values unlike t1's (so a wrong pick shows), some of them -0.0."""
    x = rng.normal(5, 1, int(np.prod(shape)))
    x[::7] = -0.0
    return torch.from_numpy(x.reshape(shape)).to(dtype)


def grid_alphas(t1: torch.Tensor, precision: str, rng) -> list[float]:
    """alphas equal to the normalized value of some element (so `norm < alpha` is a tie)."""
    x = values_of(t1)
    if x.size == 0 or x.max() == x.min():
        return []
    norms = normalized(rng.choice(x, 3), x.min(), x.max(), t1.dtype, precision)
    return [float(a) for a in norms if 0.0 <= a <= 1.0]


MODES = ("mod_select", "out=", "mod_select_", "reference")


def run_all_modes(t1, t2, alpha, precision, backend, what, modes=MODES):
    """Out of place, out=, in place (and modkern's reference) against the oracle, and check
    that the inputs are left alone by the out-of-place forms."""
    expected = oracle_select(t1, t2, alpha, precision)
    t1_before, t2_before = t1.clone(), t2.clone()
    kw = dict(backend=backend, precision=precision)

    if "mod_select" in modes:
        got = modkern.mod_select(t1, t2, alpha, **kw)
        assert_bits_equal(got, expected, f"{what} mod_select")
        assert got.data_ptr() != t1.data_ptr() or t1.numel() == 0

    if "out=" in modes:
        out = torch.full_like(t1, 7.0)
        same = modkern.mod_select(t1, t2, alpha, out=out, **kw)
        assert same is out
        assert_bits_equal(out, expected, f"{what} out=")

    assert_bits_equal(t1, t1_before, f"{what} t1 untouched")
    assert_bits_equal(t2, t2_before, f"{what} t2 untouched")

    if "mod_select_" in modes:
        work = t1.clone()
        same = modkern.mod_select_(work, t2, alpha, **kw)
        assert same is work
        assert_bits_equal(work, expected, f"{what} mod_select_")
        assert_bits_equal(t2, t2_before, f"{what} t2 untouched by mod_select_")

    if "reference" in modes:
        ref = modkern.mod_select_reference(t1.cpu(), t2.cpu(), alpha, precision)
        assert_bits_equal(ref, expected, f"{what} mod_select_reference")


def rotating_modes(i: int, backend: str) -> tuple[str, ...]:
    """Every form for the torch backend; for Triton (slow under the CPU interpreter) one
    form per alpha, in turn, so each form still meets every dtype, precision and kind."""
    if backend == "torch" or torch.cuda.is_available():
        return MODES
    return (MODES[i % 3],)


@pytest.mark.parametrize("kind", ["normal", "grid", "denormal", "negzero", "constant"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_ids)
def test_matches_oracle(dtype, precision, kind, backend, device):
    rng = np.random.default_rng(zlib.crc32(f"{dtype}{precision}{kind}".encode()))
    t1 = make_t1(kind, (13, 11), dtype, rng).to(device)
    t2 = make_t2((13, 11), dtype, rng).to(device)
    for i, alpha in enumerate(list(ALPHAS) + grid_alphas(t1, precision, rng)):
        run_all_modes(t1, t2, alpha, precision, backend, f"{kind} alpha={alpha!r}",
                      rotating_modes(i, backend))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_ids)
def test_alpha_on_every_normalized_value(dtype, precision, backend, device):
    # t1 = 0..12 (min 0, max 12): every element's normalized value, used as alpha, is a tie
    # `norm == alpha` for that element, which must keep... nothing: `<` is strict.
    t1 = torch.arange(13, dtype=torch.float64).to(dtype).to(device)
    t2 = torch.full((13,), -9.0, dtype=dtype, device=device)
    for k in range(13):
        alpha = k / 12
        expected = oracle_select(t1, t2, alpha, precision)
        got = modkern.mod_select(t1, t2, alpha, backend=backend, precision=precision)
        assert_bits_equal(got, expected, f"alpha={k}/12")
        if precision == "exact" and dtype != torch.float64:
            # float32 k/12 in alpha and in the division: element k ties and goes to t2
            assert values_of(got).tolist() == [float(i) for i in range(k)] + [-9.0] * (13 - k)


@pytest.mark.parametrize("n", [0, 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sizes_around_the_block(n, dtype, backend, device):
    rng = np.random.default_rng(n)
    t1 = make_t1("normal", (n,), dtype, rng).to(device)
    if n > BLOCK:  # outliers in several blocks, none in others
        t1[BLOCK] = 0.2
        t1[n - 1] = 0.19
    t2 = make_t2((n,), dtype, rng).to(device)
    for alpha, precision in ((0.9, "exact"), (0.0, "exact"), (0.9, "reference")):
        run_all_modes(t1, t2, alpha, precision, backend, f"n={n} alpha={alpha}")


@pytest.mark.parametrize("n", [2**14 + 1, 2**19 + 5, 2**20 + 5])
def test_large_sizes_torch(n):
    # sizes past the torch path's internal boundaries (small-tensor shortcut, chunks, groups
    # of hot blocks); a top value in every 4096-block makes every block hold a selected
    # element, plus maxima at chunk ends
    rng = np.random.default_rng(n)
    t1 = make_t1("normal", (n,), torch.float32, rng)
    t1[::BLOCK] = 0.29
    for i in (2**14 - 1, 2**18 - 1, n - 1):
        if i < n:
            t1[i] = 0.3
    t2 = make_t2((n,), torch.float32, rng)
    for alpha in (0.99,) + ((0.9, 0.0) if n < 2**15 else ()):
        run_all_modes(t1, t2, alpha, "exact", "torch", f"n={n} alpha={alpha}")


def test_empty_and_scalar_shapes(backend, device):
    for shape in [(0,), (3, 0), (), (1,), (1, 1)]:
        rng = np.random.default_rng(0)
        t1 = make_t1("normal", shape, torch.float32, rng).to(device)
        t2 = make_t2(shape, torch.float32, rng).to(device)
        for alpha in (0.0, 0.5, 1.0):
            run_all_modes(t1, t2, alpha, "exact", backend, f"shape={shape} alpha={alpha}")
            got = modkern.mod_select(t1, t2, alpha, backend=backend)
            assert got.shape == t1.shape


def views(base: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"transposed": base.t(), "step": base[:, ::3], "offset-step": base[1::2, 2:],
            "contiguous": base}


def strided(shape, layout: str, rng) -> torch.Tensor:
    """A t2 of `shape` laid out as asked (a transposed or step-sliced view)."""
    rows, cols = shape
    if layout == "transposed":
        return make_t2((cols, rows), torch.float16, rng).t()
    if layout == "step":
        return make_t2((rows, 2 * cols), torch.float16, rng)[:, ::2]
    return make_t2(shape, torch.float16, rng)


@pytest.mark.parametrize("layout2", ["transposed", "step", "contiguous"])
@pytest.mark.parametrize("layout1", ["transposed", "step", "offset-step", "contiguous"])
def test_non_contiguous(layout1, layout2, backend, device):
    rng = np.random.default_rng(5)
    base1 = make_t1("normal", (12, 12), torch.float16, rng).to(device)
    t1 = views(base1)[layout1]
    t2 = strided(tuple(t1.shape), layout2, rng).to(device)
    assert t2.is_contiguous() == (layout2 == "contiguous")
    for alpha in (0.9, 0.3):
        expected = oracle_select(t1, t2, alpha)
        assert_bits_equal(modkern.mod_select(t1, t2, alpha, backend=backend), expected,
                          f"{layout1}/{layout2}")
        out = torch.zeros_like(base1).t()[: t1.shape[0], : t1.shape[1]]  # strided out
        modkern.mod_select(t1, t2, alpha, backend=backend, out=out)
        assert_bits_equal(out, expected, f"{layout1}/{layout2} strided out=")
        # in place on a view: only the view's elements of the base change
        work_base = base1.clone()
        work = views(work_base)[layout1]
        outside = torch.ones_like(work_base, dtype=torch.bool)
        views(outside)[layout1].fill_(False)
        modkern.mod_select_(work, t2, alpha, backend=backend)
        assert_bits_equal(work, expected, f"{layout1}/{layout2} in place")
        assert torch.equal(work_base[outside], base1[outside])


def test_out_aliasing_an_input(backend, device):
    rng = np.random.default_rng(9)
    t1 = make_t1("normal", (50,), torch.float32, rng).to(device)
    t2 = make_t2((50,), torch.float32, rng).to(device)
    expected = oracle_select(t1, t2, 0.6)
    a, b = t1.clone(), t2.clone()
    modkern.mod_select(a, b, 0.6, backend=backend, out=b)  # out is t2
    assert_bits_equal(b, expected, "out=t2")
    assert_bits_equal(a, t1, "t1 untouched")
    a, b = t1.clone(), t2.clone()
    assert modkern.mod_select(a, b, 0.6, backend=backend, out=a) is a  # out is t1: in place
    assert_bits_equal(a, expected, "out=t1")


def midpoint_values(dtype: torch.dtype, rng, n: int) -> np.ndarray:
    """float64 values that are hard to round to `dtype`: exact midpoints between neighbours
    (ties to even), values just above a midpoint (torch rounds through float32: double
    rounding), subnormals of the dtype, and plain values."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}[dtype]
    base = rng.normal(0, 1, n)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(base))) - mant)
    snapped = np.round(base / ulp) * ulp
    kinds = rng.integers(0, 4, n)
    return np.select([kinds == 0, kinds == 1, kinds == 2],
                     [snapped + ulp / 2,                       # exact midpoint
                      snapped + ulp / 2 + ulp * 2.0**-30,      # just above a midpoint
                      snapped * float(torch.finfo(dtype).smallest_normal) / 4],  # subnormal
                     base)


@pytest.mark.parametrize("d1, d2", [(a, b) for a in FLOAT_DTYPES for b in FLOAT_DTYPES if a != b],
                         ids=[f"{SHORT_NAME[a]}<-{SHORT_NAME[b]}" for a in FLOAT_DTYPES
                              for b in FLOAT_DTYPES if a != b])
def test_t2_of_another_dtype(d1, d2, backend, device):
    rng = np.random.default_rng(17)
    t1 = make_t1("normal", (40, 9), d1, rng).to(device)
    t2 = torch.from_numpy(midpoint_values(d1, rng, 360).reshape(40, 9)).to(d2).to(device)
    for alpha in (0.0, 0.5):
        for precision in PRECISIONS:
            expected = oracle_select(t1, t2, alpha, precision)
            got = modkern.mod_select(t1, t2, alpha, backend=backend, precision=precision)
            assert got.dtype == d1
            assert_bits_equal(got, expected, f"{d1} <- {d2} alpha={alpha}")
            work = t1.clone()
            modkern.mod_select_(work, t2, alpha, backend=backend, precision=precision)
            assert_bits_equal(work, expected, f"{d1} <- {d2} alpha={alpha} in place")


def test_auto_backend_on_cpu_is_torch():
    t1 = torch.tensor([0.0, 1.0, 2.0])
    t2 = torch.tensor([5.0, 6.0, 7.0])
    assert_bits_equal(modkern.mod_select(t1, t2, 0.5), oracle_select(t1, t2, 0.5), "auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_differs_from_exact_only_where_the_oracle_says(dtype):
    # the float32 formula and the bf16/fp16 arithmetic (alpha rounded to the dtype, each
    # operation rounded) disagree on some elements: exactly those the oracle names
    rng = np.random.default_rng(21)
    t1 = torch.from_numpy(rng.uniform(-1, 1, (128, 128))).to(dtype)
    t2 = make_t2((128, 128), dtype, rng)
    differing = 0
    for alpha in (0.9, 0.5, 0.3, 0.7, 0.1):
        diff_oracle = take_mask(t1, alpha, "exact") != take_mask(t1, alpha, "reference")
        differing += diff_oracle.sum()
        exact = modkern.mod_select(t1, t2, alpha, precision="exact")
        ref = modkern.mod_select(t1, t2, alpha, precision="reference")
        diff = (exact.view(torch.int16) != ref.view(torch.int16)).reshape(-1).numpy()
        np.testing.assert_array_equal(diff, diff_oracle)
    assert differing > 0  # the case is not vacuous


def test_bf16_reference_rounds_the_subtraction_handworked(backend, device):
    # mn = -1, mx = 3, span 4. x = 0.99609375 = 1 - 2**-8.
    # exact: (x + 1) / 4 = 0.4990234375 < 0.5: t1 kept.
    # bf16: x + 1 = 1.99609375 lies halfway between bf16 1.9921875 (odd) and 2.0 (even):
    # ties to even give 2.0, 2.0 / 4 = 0.5, and 0.5 < 0.5 fails: t2 taken.
    t1 = torch.tensor([-1.0, 0.99609375, 3.0], dtype=torch.bfloat16, device=device)
    t2 = torch.full((3,), 7.0, dtype=torch.bfloat16, device=device)
    for precision, expected in (("exact", [-1.0, 0.99609375, 7.0]),
                                ("reference", [-1.0, 7.0, 7.0])):
        assert values_of(oracle_select(t1, t2, 0.5, precision)).tolist() == expected
        got = modkern.mod_select(t1, t2, 0.5, backend=backend, precision=precision)
        assert values_of(got).tolist() == expected, precision


def test_fp64_reference_keeps_alpha_in_float64_handworked(backend, device):
    # float64 input: "exact" rounds alpha to float32 (0.1 -> 0.100000001490116...), the
    # released code compares with the double 0.1. x = 0.1 normalizes to exactly 0.1.
    t1 = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64, device=device)
    t2 = torch.full((3,), 7.0, dtype=torch.float64, device=device)
    exact = modkern.mod_select(t1, t2, 0.1, backend=backend, precision="exact")
    ref = modkern.mod_select(t1, t2, 0.1, backend=backend, precision="reference")
    assert exact.tolist() == [0.0, 0.1, 7.0]
    assert ref.tolist() == [0.0, 7.0, 7.0]
