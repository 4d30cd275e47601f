"""merge_state_dicts on the Triton backend packs small tensors into one launch pair:
the packed path must equal the reference tensor by tensor and name the right key on error."""

import pytest
import torch

import modkern
from modkern.errors import NonFiniteError
from modkern.merging.patterns import alpha_for


def _state_dicts(device, seed):
    g = torch.Generator().manual_seed(seed)

    def w(*shape, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype).to(device)

    return {  # sizes around the block size, a 1-element and a constant tensor, two dtypes
        "a.bias": w(7), "b.norm": w(4097), "c.weight": w(63, 65), "d.one": w(1),
        "e.const": torch.full((300,), 0.5, device=device), "f.f32": w(5000, dtype=torch.float32),
        "g.big": w(70000), "h.step": torch.tensor(3, device=device),
    }


@pytest.mark.parametrize("inplace", [False, True])
def test_packed_merge_equals_reference(device, inplace):
    sd1, sd2 = _state_dicts(device, 0), _state_dicts(device, 1)
    sd2["e.const"] = sd2["e.const"] + 1
    alpha = {"c.": 0.3, "e.": 0.0, "*": 0.9}
    work = {k: v.clone() for k, v in sd1.items()}
    stats = modkern.MergeStats()
    out = modkern.merge_state_dicts(work, sd2, alpha, backend="triton", inplace=inplace,
                                    stats=stats)
    assert list(out) == list(sd1)
    for key in sd1:
        if sd1[key].is_floating_point():
            expected = modkern.mod_select_reference(sd1[key], sd2[key], alpha_for(alpha, key))
            assert torch.equal(out[key], expected), key
    assert out["h.step"].item() == 3
    # constant tensor at alpha 0 takes all of model 2; the others take their reference share
    assert stats.taken_by_key["e.const"] == 300
    assert stats.tensors_merged == 7


def test_packed_merge_names_the_bad_key(device):
    sd1, sd2 = _state_dicts(device, 0), _state_dicts(device, 1)
    sd2["c.weight"][0, 0] = float("nan")
    sd1["c.weight"][0, 0] = sd1["c.weight"].max() + 1  # so that element is taken
    with pytest.raises(NonFiniteError, match=r"'c.weight': model 2 \(other\).*flat index 0"):
        modkern.merge_state_dicts(sd1, sd2, 0.9, backend="triton")
    sd1["b.norm"][5] = float("inf")
    with pytest.raises(NonFiniteError, match=r"'b.norm': model 1 \(base\).*flat index 5"):
        modkern.merge_state_dicts(sd1, sd2, 0.9, backend="triton")
