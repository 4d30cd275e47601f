"""The engines' min/max pass (`minmax`: the mins, the per-block maxima, the copy on the way)
against numpy, on the edges that integer views of float bits make delicate: NaNs with the
sign bit set, -0.0, blocks of negatives only, infinities, a ragged last block, several
chunks, empty tensors, every float dtype. numpy has no bfloat16: bf16 values are checked
through their float32 values (exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from modkern.ops import select_torch
from modkern.ops.select_engine import TorchEngine
from modkern.ops.select_reference import INT_OF_SIZE

BLOCK = select_torch.BLOCK
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
NEG_NAN_BITS = {torch.float32: -0x400000, torch.float64: -0x8000000000000,
                torch.float16: -0x200, torch.bfloat16: -0x40}  # sign set, quiet NaN


def engines() -> list:
    found = [TorchEngine()]
    try:
        from modkern.ops.select_engine import TritonEngine
        found.append(TritonEngine())
    except ImportError:  # triton not installed: the torch engine alone
        pass
    return found


ENGINES = engines()


def reference(values: np.ndarray) -> tuple[float, np.ndarray]:
    """(min of all, max of each BLOCK-sized block) in float64; NaN where one is held."""
    blocks = [values[i:i + BLOCK] for i in range(0, values.size, BLOCK)]
    return float(np.min(values)), np.array([np.max(b) for b in blocks])


def check(engine, src: torch.Tensor) -> None:
    """The engine's minmax of src agrees with numpy: a NaN anywhere shows in min(mins)
    or in the max of its block's block_max; without NaN, the min and every block max are
    exact; the copy is src bit for bit."""
    out = torch.full_like(src, 7.0)
    mins, block_max = engine.minmax(src, copy_to=out)
    as_int = INT_OF_SIZE[src.element_size()]
    assert torch.equal(out.view(as_int), src.view(as_int))
    assert mins.dtype == block_max.dtype == src.dtype
    values = src.double().numpy()
    mn, bmax = reference(values)
    got_min, got_bmax = mins.double().min().item(), block_max.double().numpy()
    assert got_bmax.shape == bmax.shape
    if np.isnan(values).any():
        assert np.isnan(got_min) or np.isnan(got_bmax).any()
    else:
        assert got_min == mn
    clean = ~np.isnan(bmax)  # blocks without NaN: their max is exact
    np.testing.assert_array_equal(got_bmax[clean], bmax[clean])
    no_copy = engine.minmax(src)
    assert torch.equal(no_copy[1].view(as_int), block_max.view(as_int))


def with_bits(dtype: torch.dtype, values: list[float], at: dict[int, int], n: int
              ) -> torch.Tensor:
    """n elements cycling through `values`, then raw bit patterns placed at indices."""
    t = torch.tensor(values, dtype=torch.float64).repeat(-(-n // len(values)))[:n].to(dtype)
    bits = t.view(INT_OF_SIZE[t.element_size()])
    for i, pattern in at.items():
        bits[i] = pattern
    return t


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, BLOCK - 1, BLOCK, 2 * BLOCK + 17])
def test_signs_zeros_and_ragged_blocks(engine, dtype, n):
    # block 0: negatives and -0.0 only; block 1: -0.0 and +0.0; last: ragged, mixed
    t = with_bits(dtype, [-3.5, -0.0, -1e-3, -2.0], {}, n)
    if n > BLOCK:
        t[BLOCK:2 * BLOCK] = torch.tensor([-0.0, 0.0], dtype=dtype).repeat(BLOCK // 2)
        t[-1] = 1.25
    check(engine, t)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_only_negative_zero(engine, dtype):
    t = torch.full((BLOCK + 3,), -0.0, dtype=dtype)
    check(engine, t)
    assert engine.minmax(t)[1].max().item() == 0.0


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", [0, BLOCK - 1, BLOCK + 5, 2 * BLOCK + 16])
@pytest.mark.parametrize("neighbours", [[-1.0, -2.0], [-1.0, 2.0], [0.5, 3.0]])
def test_nan_of_either_sign_is_seen(engine, dtype, where, neighbours):
    for pattern in (NEG_NAN_BITS[dtype], float("nan")):
        t = with_bits(dtype, neighbours, {}, 2 * BLOCK + 17)
        if isinstance(pattern, int):
            t.view(INT_OF_SIZE[t.element_size()])[where] = pattern
        else:
            t[where] = pattern
        check(engine, t)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinities(engine, dtype):
    for inf in (float("inf"), -float("inf")):
        t = with_bits(dtype, [-1.0, -0.5], {}, BLOCK + 9)
        t[BLOCK + 2] = inf
        check(engine, t)


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty(engine, dtype):
    mins, block_max = engine.minmax(torch.empty(0, dtype=dtype))
    assert block_max.numel() == 0 and mins.dtype == block_max.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_chunks(monkeypatch, dtype):
    # chunks of one block and of three: chunk edges inside and at the ragged end
    g = torch.Generator().manual_seed(1)
    t = torch.randn(7 * BLOCK + 100, generator=g, dtype=torch.float64).to(dtype)
    t[3 * BLOCK:4 * BLOCK] = -t[3 * BLOCK:4 * BLOCK].abs()
    for chunk_blocks in (1, 3):
        monkeypatch.setattr(select_torch, "CHUNK_BYTES", chunk_blocks * BLOCK
                            * t.element_size())
        check(TorchEngine(), t)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(DTYPES), st.integers(1, 3 * BLOCK), st.data())
def test_random_bit_patterns(dtype, n, data):
    # any bit pattern: NaNs and infinities of both signs, subnormals, zeros
    width = torch.finfo(dtype).bits
    seed = data.draw(st.integers(0, 2 ** 31))
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << (width - 1)), (1 << (width - 1)) - 1, (n,), generator=g,
                         dtype=torch.int64).to(INT_OF_SIZE[width // 8])
    check(TorchEngine(), bits.view(dtype))
