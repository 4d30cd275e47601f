"""The compaction on the device (kernels/mod_select.py count_selected, emit_selected, run
by the Triton engine's `groups`): the sorted flat indices of the elements the select takes,
as the checkpoint merge reads OTHER at them. Checked against the oracle's take mask
(numpy, float64), the torch engine's `selected_chunks`, and its groups, group for group,
on every dtype and precision, sizes around the block size, empty and constant tensors,
alpha 0 and 1, and groups over several windows of blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from modkern.ops import select_torch
from modkern.ops.select_reference import select_threshold
from oracle_select import FLOAT_DTYPES, take_mask

pytest.importorskip("triton", reason="triton is not installed")
from modkern.ops.select_engine import TorchEngine, TritonEngine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = select_torch.BLOCK
SIZES = [1, 17, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17]


def chunks_of_both(flat: torch.Tensor, alpha: float, precision: str = "exact"
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the kernels' groups' indices, the torch engine's groups' indices)."""
    engine = TritonEngine()
    mins, block_max = engine.minmax(flat)
    v = select_threshold(mins.min(), block_max.max(), alpha, precision)
    kernel = [c.cpu() for c in engine.selected(flat, v, block_max)]
    torch_groups = [g.indices().cpu() for g in TorchEngine().groups(flat, v, block_max)]
    return kernel, torch_groups


def check(flat: torch.Tensor, alpha: float, precision: str = "exact") -> None:
    kernel, torch_groups = chunks_of_both(flat, alpha, precision)
    assert len(kernel) == len(torch_groups)
    for got, want in zip(kernel, torch_groups):
        assert got.dtype == torch.int64 and torch.equal(got, want)
    got = torch.cat(kernel) if kernel else torch.zeros(0, dtype=torch.int64)
    np.testing.assert_array_equal(got.numpy(),
                                  np.flatnonzero(take_mask(flat.cpu(), alpha, precision)))
    v = select_threshold(flat.min(), flat.max(), alpha, precision).reshape(1)
    hot = select_torch.hot_blocks(select_torch.minmax(flat)[1], v)
    chunks = list(select_torch.selected_chunks(flat, v, hot))
    assert torch.equal(got, torch.cat(chunks).cpu() if chunks else got[:0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_indices_equal_the_oracle_and_torch(dtype, n, alpha):
    g = torch.Generator().manual_seed(n)
    check(torch.randn(n, generator=g).to(dtype).to(DEVICE), alpha)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_constant_tensor(dtype):
    """Normalized values are all 0: nothing is taken unless alpha is 0, then everything."""
    flat = torch.full((BLOCK + 5,), 0.25, dtype=dtype, device=DEVICE)
    for alpha, count in ((0.9, 0), (0.0, flat.numel())):
        check(flat, alpha)
        kernel, _ = chunks_of_both(flat, alpha)
        assert sum(c.numel() for c in kernel) == count


def test_empty_tensor_has_no_chunks():
    flat = torch.empty(0, dtype=torch.bfloat16, device=DEVICE)
    v = torch.tensor(0.0, dtype=torch.bfloat16)
    assert list(TritonEngine().selected(flat, v, torch.empty(0, dtype=flat.dtype))) == []


@pytest.mark.parametrize("span_group, groups", [
    (4, [(0, 2), (4, 7), (9, 10)]),  # the hot blocks of each window of 4 blocks
    (3, [(0, 2), (4, 6), (6, 7), (9, 10)]),
    (1024, [(0, 10)])])
def test_groups_split_the_hot_blocks(monkeypatch, span_group, groups):
    """Hot blocks 0, 1, 4, 5, 6, 9 (the others hold only values below v): the groups, their
    counts and their indices, the same on both engines, cold blocks in between skipped."""
    monkeypatch.setattr(select_torch, "SPAN_GROUP", span_group)
    flat = torch.zeros(9 * BLOCK + 3, dtype=torch.float32, device=DEVICE)
    for b in (0, 1, 4, 5, 6, 9):
        flat[b * BLOCK + torch.arange(0, min(BLOCK, flat.numel() - b * BLOCK), 7)] = 1.0
    engines = [TritonEngine(), TorchEngine()]
    mins, block_max = engines[0].minmax(flat)
    v = select_threshold(mins.min(), block_max.max(), 0.5, "exact")
    for engine in engines:
        found = list(engine.groups(flat, v, block_max))
        assert [(g.first_block, g.end_block) for g in found] == groups
        for g in found:
            idx = g.indices().cpu()
            want = torch.nonzero(flat[g.start:g.stop] >= 1.0).flatten().cpu() + g.start
            assert g.count == idx.numel() and torch.equal(idx, want)
            assert (g.start, g.stop) == (g.first_block * BLOCK,
                                         min(g.end_block * BLOCK, flat.numel()))
    check(flat, 0.5)


@given(xs=st.lists(st.floats(-4, 4, allow_nan=False, allow_subnormal=True), min_size=1,
                   max_size=40),
       repeat=st.integers(1, 300), dtype=st.sampled_from(FLOAT_DTYPES),
       alpha=st.floats(0, 1), precision=st.sampled_from(["exact", "reference"]))
def test_indices_property(xs, repeat, dtype, alpha, precision):
    # a short pattern tiled over up to a few blocks: ties, -0.0 and subnormals across blocks
    flat = torch.tensor(xs * repeat, dtype=torch.float64).to(dtype).to(DEVICE)
    check(flat, alpha, precision)
