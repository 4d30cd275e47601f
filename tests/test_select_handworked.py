"""MoD weight select on cases worked out by hand (docs/design.md 1.1)."""

import pytest
import torch

import modkern


def test_paper_example_fp32(device, backend):
    # min 0, max 10: normalized values are x / 10; alpha 0.5 keeps x < 5 exactly.
    t1 = torch.tensor([0.0, 2.0, 4.0, 5.0, 6.0, 10.0], device=device)
    t2 = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], device=device)
    out = modkern.mod_select(t1, t2, 0.5, backend=backend)
    assert out.tolist() == [0.0, 2.0, 4.0, -4.0, -5.0, -6.0]


def test_alpha_ends(device, backend):
    t1 = torch.tensor([1.0, 2.0, 3.0], device=device)
    t2 = torch.tensor([7.0, 8.0, 9.0], device=device)
    # alpha 0: norm < 0 never holds, everything comes from t2
    assert modkern.mod_select(t1, t2, 0.0, backend=backend).tolist() == [7.0, 8.0, 9.0]
    # alpha 1: only the maximum (norm exactly 1) comes from t2
    assert modkern.mod_select(t1, t2, 1.0, backend=backend).tolist() == [1.0, 2.0, 9.0]


def test_bf16_reference_rounds_alpha(device, backend):
    # bf16(0.9) = 0.8984375. With min 0 and max 1, x = 0.8984375 normalizes to itself:
    # exact precision compares with float32(0.9) and keeps t1; the released code's bf16
    # arithmetic compares 0.8984375 < 0.8984375 and takes t2.
    t1 = torch.tensor([0.0, 0.8984375, 1.0], dtype=torch.bfloat16, device=device)
    t2 = torch.tensor([5.0, 5.0, 5.0], dtype=torch.bfloat16, device=device)
    exact = modkern.mod_select(t1, t2, 0.9, backend=backend, precision="exact")
    ref = modkern.mod_select(t1, t2, 0.9, backend=backend, precision="reference")
    assert exact.tolist() == [0.0, 0.8984375, 5.0]
    assert ref.tolist() == [0.0, 5.0, 5.0]


@pytest.mark.parametrize("alpha, expected", [(0.5, [3.0] * 4), (0.0, [4.0] * 4)])
def test_constant_tensor(device, backend, alpha, expected):
    t1 = torch.full((4,), 3.0, device=device)
    t2 = torch.full((4,), 4.0, device=device)
    assert modkern.mod_select(t1, t2, alpha, backend=backend).tolist() == expected


def test_inplace_writes_only_selected(device, backend):
    t1 = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], device=device)
    t2 = torch.full((5,), 9.0, device=device)
    same = modkern.mod_select_(t1, t2, 0.6, backend=backend)
    assert same is t1
    assert t1.tolist() == [0.0, 1.0, 2.0, 9.0, 9.0]


def test_merge_state_dicts_carries_other_entries(device):
    sd1 = {"w": torch.tensor([0.0, 1.0], device=device), "step": torch.tensor(3)}
    sd2 = {"w": torch.tensor([5.0, 6.0], device=device), "step": torch.tensor(4)}
    out = modkern.merge_state_dicts(sd1, sd2, 0.5)
    assert list(out) == ["w", "step"]
    assert out["w"].tolist() == [0.0, 6.0]
    assert out["step"] is sd1["step"]
