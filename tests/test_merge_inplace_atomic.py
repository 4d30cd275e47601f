"""`merge_state_dicts(inplace=True)` is all or nothing: a merge that raises on any tensor
(a NaN/inf in model 1's tensor, or in model 2's where it is taken, found only while
selecting) leaves every tensor of model 1 as it was, tied weights included, and fills no
stats; a merge that succeeds equals the out-of-place merge bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

import modkern
from modkern import MergeStats, NonFiniteError
from modkern.merging import units
from oracle_select import assert_bits_equal, oracle_select

SMALL = 1000  # tensors up to this many elements are packed on Triton in these tests


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Both kinds of unit with small tensors: packed (<= SMALL) and single (larger)."""
    monkeypatch.setattr(units, "BATCH_MAX", SMALL)


def model(seed: int, tied: bool = True, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Large tensors (merged one by one), small ones (packed on Triton), a tied pair."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=torch.float32):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.02).to(dtype).to(device)

    embed = rnd(40, 64)
    return {"embed.weight": embed,
            "layers.0.mlp.weight": rnd(64, 48),
            "layers.0.norm.weight": rnd(64, dtype=torch.bfloat16),
            "layers.1.mlp.weight": rnd(48, 64, dtype=torch.float16).t(),  # strided
            "layers.1.norm.weight": rnd(64),
            "layers.1.bias": rnd(500),
            "final.weight": rnd(70, 50),
            "lm_head.weight": embed if tied else rnd(40, 64)}


# (key, model whose value is bad, flat index): the index holds model 1's maximum, so it is
# always taken from model 2 (alpha <= 1); the bad key is merged last or among the last
PLANTS = [("final.weight", "other"), ("final.weight", "base"), ("layers.1.bias", "other"),
          ("layers.0.norm.weight", "other"), ("layers.1.mlp.weight", "other")]


def plant(sd1, sd2, key: str, which: str, value: float) -> None:
    t1 = sd1[key]
    target = sd2[key] if which == "other" else t1
    flat = int(t1.reshape(-1).float().argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t1.shape))
    target[idx] = value


@pytest.mark.parametrize("key, which", PLANTS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_merge_that_raises_writes_nothing(key, which, bad, backend, device):
    sd1, sd2 = model(1, device=device), model(2, device=device)
    plant(sd1, sd2, key, which, bad)
    before = {k: v.clone() for k, v in sd1.items()}
    stats = MergeStats()
    with pytest.raises(NonFiniteError) as e:
        modkern.merge_state_dicts(sd1, sd2, 0.8, inplace=True, backend=backend, stats=stats)
    assert repr(key) in str(e.value)
    assert ("model 2" if which == "other" else "model 1") in str(e.value)
    for k in sd1:
        assert_bits_equal(sd1[k], before[k], f"{k} untouched")
    assert sd1["embed.weight"] is sd1["lm_head.weight"]
    assert stats == MergeStats(), "no counts from a merge that raised"


@pytest.mark.parametrize("tied", [True, False])
def test_a_merge_that_succeeds_equals_out_of_place(tied, backend, device):
    sd1, sd2 = model(3, tied, device), model(4, tied, device)
    expected = modkern.merge_state_dicts(sd1, sd2, 0.8, backend=backend)
    for k in sd1:
        assert_bits_equal(expected[k], oracle_select(sd1[k], sd2[k], 0.8), k)
    ptrs = {k: v.data_ptr() for k, v in sd1.items()}
    stats = MergeStats()
    out = modkern.merge_state_dicts(sd1, sd2, 0.8, inplace=True, backend=backend, stats=stats)
    assert out is sd1
    for k in sd1:
        assert sd1[k].data_ptr() == ptrs[k]
        assert_bits_equal(sd1[k], expected[k], k)
    assert stats.tensors_merged + stats.tensors_carried == len(sd1)
    assert stats.tensors_merged == len(sd1) - tied


def test_a_later_bad_value_not_taken_is_harmless(backend, device):
    sd1, sd2 = model(5, device=device), model(6, device=device)
    low = int(sd1["final.weight"].argmin())  # model 1's minimum: never taken at alpha > 0
    sd2["final.weight"].view(-1)[low] = math.nan
    expected = modkern.merge_state_dicts(sd1, sd2, 0.99, backend=backend)
    modkern.merge_state_dicts(sd1, sd2, 0.99, inplace=True, backend=backend)
    for k in sd1:
        assert_bits_equal(sd1[k], expected[k], k)
