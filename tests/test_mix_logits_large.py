"""Logits of magnitude 1e4 (mixed signs, -inf masks, mixtures that underflow float32) on
every backend and every layout, forward and backward, against the float64 reference at the
usual float32 tolerances (mix_cases.py says why they still hold at 1e4).
The -inf/NaN pattern must match the reference exactly."""

from __future__ import annotations

import pytest
import torch
from mix_cases import (DTYPES, assert_close_grad, assert_close_out, backend_fixture, big_pair,
                       logits)

from modkern import mix_logits, mix_logits_many
from modkern.ops.mix_reference import mix_logits_many_reference, weight_grad_reference

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
mix_backend = backend_fixture()

ALPHAS = torch.tensor([0.3, 0.5, 1e-6, 0.9, 0.5, 0.25, 0.7, 0.1, 0.6, 0.4])


def _ref(ls, ws):
    return mix_logits_many_reference([t.double() for t in ls], [
        w.double() if isinstance(w, torch.Tensor) else w for w in ws])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [6, 10])  # few rows (decoding path) and more
def test_forward_is_exact_at_1e4(device, backend, dtype, rows):
    l1, l2 = big_pair(rows=rows, V=1031, dtype=dtype)
    alpha = ALPHAS[:rows]
    for a in (0.3, alpha):
        out = mix_logits(l1.to(device), l2.to(device), a.to(device) if
                         isinstance(a, torch.Tensor) else a, backend=backend)
        assert_close_out(out.cpu(), _ref([l1, l2], [a, 1 - a]))


def test_three_models_and_n_valid_at_1e4(device, backend):
    l1, l2 = big_pair(rows=6, V=777)
    l3 = (logits((6, 777), seed=5) - 1e4).to(torch.bfloat16)
    w = torch.softmax(logits((6, 3), seed=9), -1)
    out = mix_logits_many([t.to(device) for t in (l1, l2, l3)], w.to(device),
                          backend=backend, n_valid=700)
    assert_close_out(out[:, :700].cpu(), _ref([l1[:, :700], l2[:, :700], l3[:, :700]],
                                              list(w.unbind(-1))))
    assert (out[:, 700:] == float("-inf")).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_exact_at_1e4(device, backend, dtype):
    l1, l2 = big_pair(rows=6, V=1031, dtype=dtype)
    alpha = ALPHAS[:6]
    g = logits((6, 1031), seed=11)
    ins = [t.detach().to(device).requires_grad_() for t in (l1, l2, alpha)]
    out = mix_logits(*ins, backend=backend)
    fin = torch.isfinite(out)
    (out.where(fin, 0.0) * g.to(device)).sum().backward()
    rins = [t.detach().double().requires_grad_() for t in (l1, l2, alpha)]
    ref = mix_logits_many_reference(rins[:2], [rins[2], 1 - rins[2]])
    (ref.where(torch.isfinite(ref), 0.0) * g.double()).sum().backward()
    assert_close_grad(ins[0].grad.cpu(), rins[0].grad, dtype)
    assert_close_grad(ins[1].grad.cpu(), rins[1].grad, dtype)
    gout = g.double().where(fin.cpu(), 0.0)
    wg = weight_grad_reference([l1.double(), l2.double()], [alpha.double(), 1 - alpha.double()],
                               gout)
    assert_close_grad(ins[2].grad.cpu(), wg[:, 0] - wg[:, 1], torch.float32)


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_layouts_at_1e4(device, splits):
    """Both Triton forward layouts and the split backward, directly."""
    pytest.importorskip("triton")
    from modkern.kernels import mix_logits as km
    l1, l2 = big_pair(rows=6, V=2 * km.BLOCK + 37)
    W = torch.stack([ALPHAS[:6], 1 - ALPHAS[:6]], 1)
    out, stats = km.forward([l1.to(device), l2.to(device)], W.to(device), None, splits=splits)
    assert_close_out(out.cpu(), _ref([l1, l2], [W[:, 0], W[:, 1]]))
    assert torch.equal(stats[..., 0].cpu(), torch.stack([l1.amax(-1), l2.amax(-1)], -1))
