"""The torch engine's select from a tensor at low alpha: a group of hot blocks that takes
many of its elements is patched by masks over its range, a sparse one at its indices
(modkern.ops.select_pipeline.take_by_groups). Checked against the numpy oracle, with groups
of both kinds in one tensor, and for non-finite values of model 2 in a dense and in a sparse
group: the same first index as the element-by-element route, and nothing written in place."""

from __future__ import annotations

import math

import pytest
import torch

import modkern
from modkern import NonFiniteError
from modkern.ops import select_torch
from modkern.ops.select_source import DENSE_FRACTION
from oracle_select import assert_bits_equal, oracle_select, take_mask

GROUP = select_torch.SPAN_GROUP * select_torch.BLOCK  # elements of one group's window


def mixed_pair(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Three groups and a ragged tail: the first takes about half its elements at alpha
    0.5, the second only a few (its values are small), the third about half again."""
    g = torch.Generator().manual_seed(7)
    n = 3 * GROUP + 12_345
    t1 = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    t1[GROUP:2 * GROUP] = t1[GROUP:2 * GROUP] * 0.01 - 0.5  # below alpha 0.5's threshold
    t1[GROUP + 3] = 0.99  # one large value: the second group still has hot blocks
    t2 = torch.randn(n, generator=g, dtype=torch.float64)
    return t1.to(dtype), t2.to(dtype)


def group_fractions(t1: torch.Tensor, alpha: float) -> list[float]:
    """The fraction of each group's window that the oracle takes from model 2."""
    take = torch.from_numpy(take_mask(t1, alpha))
    return [float(take[i:i + GROUP].double().mean()) for i in range(0, t1.numel(), GROUP)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5])
def test_mixed_groups_equal_the_oracle(dtype, alpha):
    t1, t2 = mixed_pair(dtype)
    fractions = group_fractions(t1, alpha)
    if alpha == 0.5:  # the case this file is about: dense and sparse groups together
        assert fractions[0] > DENSE_FRACTION > fractions[1] > 0
        assert fractions[2] > DENSE_FRACTION
    expected = oracle_select(t1, t2, alpha)
    assert_bits_equal(modkern.mod_select(t1, t2, alpha, backend="torch"), expected)
    inplace = t1.clone()
    modkern.mod_select_(inplace, t2, alpha, backend="torch")
    assert_bits_equal(inplace, expected)
    # t2 of another dtype, converted as it is taken
    assert_bits_equal(modkern.mod_select(t1, t2.double(), alpha, backend="torch"),
                      oracle_select(t1, t2.double(), alpha))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["dense", "sparse", "tail"])
def test_first_non_finite_index_and_nothing_written_in_place(bad, where):
    t1, t2 = mixed_pair(torch.bfloat16)
    take = torch.from_numpy(take_mask(t1, 0.5))
    selected = torch.nonzero(take).flatten()
    first = {"dense": int(selected[selected < GROUP][100]),
             "sparse": GROUP + 3,
             "tail": int(selected[-1])}[where]
    later = int(selected[-1]) if where != "tail" else None
    t2[first] = bad
    if later is not None:
        t2[later] = bad
    t2[torch.nonzero(~take).flatten()[:10]] = bad  # not selected: harmless
    with pytest.raises(NonFiniteError) as e:
        modkern.mod_select(t1, t2, 0.5, backend="torch", name="w")
    assert f"index {first}" in str(e.value) or str(first) in str(e.value), str(e.value)
    before = t1.clone()
    with pytest.raises(NonFiniteError):
        modkern.mod_select_(t1, t2, 0.5, backend="torch", name="w")
    assert_bits_equal(t1, before, "in place: nothing written")
