"""Model 2 read from a file (the checkpoint merge's route): group by group of hot blocks,
a range that takes many elements is read whole and patched by masks (no index), the
others at their elements' pages. Checked against the oracle on both engines, with each
route forced and with the rule, on every dtype, odd sizes and alphas 0 to 1; the bytes
each route reads; the mask patch and the finiteness test against hand-made cases; and
non-finite values of model 2 found at the same index by every route."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from modkern.checkpoint.safetensors_io import PAGE, SafetensorsReader
from modkern.errors import CheckpointError, NonFiniteError
from modkern.ops import select_source, select_torch
from modkern.ops.select_context import SelectContext
from modkern.ops.select_engine import engine_for
from modkern.ops.select_pipeline import select_flat
from modkern.ops.select_reference import select_threshold
from modkern.ops.select_source import ReaderSource
from oracle_select import FLOAT_DTYPES, assert_bits_equal, oracle_select, take_mask

BLOCK = select_torch.BLOCK
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENGINES = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
ROUTES = {"rule": None, "ranges": 0.0, "indices": 2.0}  # DENSE_FRACTION for each


@pytest.fixture
def pair_file(tmp_path):
    """(t1, t2 in a file of its own dtype, path) for a tensor of 5 blocks and a bit."""
    def make(dtype, n=5 * BLOCK + 123, other_dtype=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        t1 = (torch.randn(n, generator=g) * 0.02).to(dtype)
        t2 = (torch.randn(n, generator=g) * 0.02).to(other_dtype or dtype)
        path = tmp_path / f"other-{seed}.safetensors"
        save_file({"w": t2.reshape(-1, 1)}, str(path))
        return t1, t2, path
    return make


def merge_from_file(t1, path, alpha, backend, first=0):
    """(the merged tensor on the CPU, elements taken, bytes of OTHER's data read)."""
    flat = t1.clone().to(DEVICE)
    with SafetensorsReader(path, "random") as reader:
        result = select_flat(flat, ReaderSource(reader, "w", first), alpha, precision="exact",
                             engine=engine_for(backend), context=SelectContext("w"))
        return flat.cpu(), result.taken, reader.bytes_read - 8 - len(reader.header_bytes)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.5, 0.9, 1.0])
def test_equals_the_oracle(pair_file, monkeypatch, backend, route, dtype, alpha):
    if ROUTES[route] is not None:
        monkeypatch.setattr(select_source, "DENSE_FRACTION", ROUTES[route])
    t1, t2, path = pair_file(dtype, other_dtype=torch.float32 if dtype == torch.float16
                             else None)
    got, taken, _ = merge_from_file(t1, path, alpha, backend)
    assert_bits_equal(got, oracle_select(t1, t2, alpha))
    assert taken == int(take_mask(t1, alpha).sum())


def threshold(t1, alpha):
    return select_threshold(t1.min(), t1.max(), alpha, "exact")


@pytest.mark.parametrize("backend", ENGINES)
def test_bytes_read_by_each_route(pair_file, monkeypatch, backend):
    t1, _, path = pair_file(torch.bfloat16, n=8 * BLOCK)
    monkeypatch.setattr(select_source, "DENSE_FRACTION", 0.0)
    _, taken, asked = merge_from_file(t1, path, 0.5, backend)
    assert asked == t1.numel() * 2  # every hot block read once, as one range per group
    monkeypatch.setattr(select_source, "DENSE_FRACTION", 2.0)
    _, taken_idx, asked_idx = merge_from_file(t1, path, 0.99, backend)
    assert 0 < taken_idx < 10 and asked_idx <= 2 * PAGE * taken_idx  # pages only


def test_the_rule_reads_dense_groups_whole_and_sparse_ones_by_pages(pair_file):
    t1, _, path = pair_file(torch.bfloat16, n=8 * BLOCK)
    for alpha, whole in ((0.3, True), (0.99, False)):
        _, taken, asked = merge_from_file(t1, path, alpha, "torch")
        assert (asked == t1.numel() * 2) == whole, (alpha, taken, asked)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("route", ["ranges", "indices"])
def test_nonfinite_other_found_at_the_same_index(pair_file, monkeypatch, backend, route,
                                                 tmp_path):
    monkeypatch.setattr(select_source, "DENSE_FRACTION", ROUTES[route])
    t1, t2, _ = pair_file(torch.bfloat16)
    taken = torch.nonzero(t1 >= threshold(t1, 0.3)).flatten()
    bad = [int(taken[len(taken) // 2]), int(taken[-1])]
    t2[bad[0]], t2[bad[1]] = float("inf"), float("nan")
    path = tmp_path / "bad.safetensors"
    save_file({"w": t2.reshape(-1, 1)}, str(path))
    with pytest.raises(NonFiniteError, match=f"flat index {bad[0]},"):
        merge_from_file(t1, path, 0.3, backend)


@pytest.mark.parametrize("backend", ENGINES)
def test_dense_and_sparse_groups_in_one_tensor(tmp_path, monkeypatch, backend):
    """Windows of 2 blocks: the loud blocks' groups take many (read whole), the quiet
    ones' few (read by pages); the result is the oracle's either way."""
    monkeypatch.setattr(select_torch, "SPAN_GROUP", 2)
    g = torch.Generator().manual_seed(5)
    t1 = torch.randn(9 * BLOCK + 7, generator=g)
    t1[2 * BLOCK:5 * BLOCK] *= 4  # windows 1 and 2 hold most of the top of the range
    t1 = t1.to(torch.bfloat16)
    t2 = torch.randn(t1.numel(), generator=g).to(torch.bfloat16)
    path = tmp_path / "other.safetensors"
    save_file({"w": t2}, str(path))
    got, taken, asked = merge_from_file(t1, path, 0.6, backend)
    assert_bits_equal(got, oracle_select(t1, t2, 0.6))
    assert 4 * BLOCK * 2 <= asked < t1.numel() * 2  # the loud windows whole, not the rest


def test_row_block_reads_its_own_rows(pair_file):
    """`first` shifts every read: a row block merged alone equals that part of the whole."""
    t1, t2, path = pair_file(torch.float32, n=6 * BLOCK)
    first = 2 * BLOCK + 5
    for alpha in (0.4, 0.95):  # a range read and page reads
        part, _, _ = merge_from_file(t1[first:].clone(), path, alpha, "torch", first=first)
        # the threshold is the part's own here (its min and max)
        assert_bits_equal(part, oracle_select(t1[first:], t2[first:], alpha))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_patch_where_against_hand_cases(dtype):
    dst = torch.tensor([-1.0, 0.5, 2.0, 0.0, -0.0, 3.0], dtype=dtype)
    t2 = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0], dtype=torch.float64)
    v = torch.tensor(0.0, dtype=dtype)
    taken, bad = select_torch.patch_where(dst, t2, v)
    assert (taken, bad) == (5, -1)  # -0.0 >= 0.0 too
    assert dst.tolist() == [-1.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    dst = torch.tensor([1.0, -1.0, 2.0], dtype=dtype)
    before = dst.clone()
    t2 = torch.tensor([5.0, float("nan"), float("inf")], dtype=dtype)
    assert select_torch.patch_where(dst, t2, v) == (0, 2)  # the NaN is not selected
    assert torch.equal(dst, before)  # nothing written


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_from_bits(dtype):
    info = torch.finfo(dtype)
    t = torch.tensor([0.0, -0.0, info.max, -info.max, info.tiny, float("inf"), float("-inf"),
                      float("nan"), -float("nan")], dtype=dtype)
    assert select_torch.nonfinite(t).tolist() == [False] * 5 + [True] * 4


def test_read_range(tmp_path):
    t = torch.arange(3000, dtype=torch.float32).reshape(30, 100)
    save_file({"t": t}, str(tmp_path / "x.safetensors"))
    with SafetensorsReader(tmp_path / "x.safetensors", "random") as r:
        before = r.bytes_read
        assert torch.equal(r.read_range("t", 250, 1234), t.view(-1)[250:1234])
        assert r.bytes_read - before == (1234 - 250) * 4
        assert r.read_range("t", 7, 7).numel() == 0
        with pytest.raises(CheckpointError, match=r"elements \[2990, 3001\)"):
            r.read_range("t", 2990, 3001)
