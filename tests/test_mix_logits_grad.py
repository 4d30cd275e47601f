"""Gradients of mix_logits: gradcheck of the torch path in float64, every backend's backward
against autograd of the float64 reference (and the analytic weight derivative where the
reference's `where` hides it), finiteness wherever the output is finite.
Tolerances are written down and justified in mix_cases.py."""

from __future__ import annotations

import pytest
import torch
from mix_cases import DTYPES, NEG_INF, assert_close_grad, backend_fixture, hard_pair, logits

from modkern import mix_logits, mix_logits_many
from modkern.ops.mix_reference import mix_logits_many_reference, weight_grad_reference

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
mix_backend = backend_fixture()


def f64(*shape, seed=0, scale=2.0):
    return logits(shape, torch.float64, scale=scale, seed=seed).requires_grad_()


def test_gradcheck_two_models_tensor_alpha():
    l1, l2 = f64(3, 11, seed=1), f64(3, 11, seed=2)
    alpha = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: mix_logits(a, b, c, backend="torch"), (l1, l2, alpha))


def test_gradcheck_three_models_masked_and_padded():
    ls = [f64(2, 3, 13, seed=i) for i in range(3)]
    with torch.no_grad():
        ls[0][..., 2] = NEG_INF
        ls[1][..., 2] = NEG_INF   # masked in two of three: still finite
        ls[2][0, 0, 5:] -= 40.0   # large gap
    w = torch.softmax(logits((2, 3, 3), torch.float64, seed=7), -1).requires_grad_()
    assert torch.autograd.gradcheck(
        # the padded columns are -inf (no finite difference there): check the rest
        lambda a, b, c, d: mix_logits_many([a, b, c], d, backend="torch", n_valid=11)[..., :11],
        (*ls, w))


def test_gradcheck_scalar_tensor_alpha_and_huge_gap():
    l1, l2 = f64(2, 9, seed=3), f64(2, 9, seed=4)
    with torch.no_grad():
        l1[0, 4:] -= 800.0  # model 1's tail at e^-800: below float64's exp range
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: mix_logits(a, b, c, backend="torch"), (l1, l2, alpha))


def _grads(fn, tensors, g):
    out = fn(*tensors)
    fin = torch.isfinite(out)
    (out.where(fin, 0.0) * g.to(out.dtype)).sum().backward()
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(device, backend, dtype):
    l1, l2 = hard_pair(rows=5, V=1031, dtype=dtype)
    alpha = torch.tensor([0.3, 1e-6, 0.5, 0.9, 1 - 1e-6])  # interior weights
    g = logits((5, 1031), seed=11)
    ins = [l1.detach().to(device).requires_grad_(), l2.detach().to(device).requires_grad_(),
           alpha.detach().to(device).requires_grad_()]
    out, got = _grads(lambda a, b, c: mix_logits(a, b, c, backend=backend), ins, g.to(device))
    rins = [l1.detach().double().requires_grad_(), l2.detach().double().requires_grad_(),
            alpha.detach().double().requires_grad_()]
    _, want = _grads(lambda a, b, c: mix_logits_many_reference([a, b], [c, 1 - c]), rins, g)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close_grad(got[0].cpu(), want[0], dtype)
    assert_close_grad(got[1].cpu(), want[1], dtype)
    assert_close_grad(got[2].cpu(), want[2], torch.float32)
    assert (got[0][:, 1:3] == 0).all() and (got[1][:, 1:3] == 0).all()  # masked: no grad


def test_alpha_at_zero_and_one_has_finite_true_gradients(device, backend):
    # At alpha in {0, 1} the where() of a naive formula makes NaN (log 0 times 0); here every
    # gradient is finite and the alpha gradient is the true one, (p1 - p2) / q summed.
    l1, l2 = logits((4, 300), seed=1), logits((4, 300), seed=2)
    l1[:, :2] = NEG_INF
    l2[:, 1:3] = NEG_INF
    alpha = torch.tensor([0.0, 1.0, 0.0, 1.0])
    g = logits((4, 300), seed=3)
    ins = [t.detach().to(device).requires_grad_() for t in (l1, l2, alpha)]
    out, got = _grads(lambda a, b, c: mix_logits(a, b, c, backend=backend), ins, g.to(device))
    for t in got:
        assert torch.isfinite(t).all()
    # logits: the dropped model gets exactly 0, the kept one log_softmax's gradient
    assert (got[1][1] == 0).all() and (got[0][0] == 0).all()
    rins = [l1.detach().double().requires_grad_(), l2.detach().double().requires_grad_(),
            alpha.detach().double().requires_grad_()]
    _, want = _grads(lambda a, b, c: mix_logits_many_reference([a, b], [c, 1 - c]), rins, g)
    assert_close_grad(got[0].cpu(), want[0], torch.float32)
    assert_close_grad(got[1].cpu(), want[1], torch.float32)
    gout = g.double().where(torch.isfinite(out.cpu()), 0.0)
    wg = weight_grad_reference([l1.double(), l2.double()], [alpha.double(), 1 - alpha.double()],
                               gout)
    assert_close_grad(got[2].cpu(), wg[:, 0] - wg[:, 1], torch.float32)


def test_nan_in_dropped_model_gets_no_nan_gradient(device, backend):
    l1, l2 = logits((2, 200), seed=1), logits((2, 200), seed=2)
    l2[0, 5] = float("nan")
    l2[1] = NEG_INF
    alpha = torch.tensor([1.0, 1.0])
    ins = [t.detach().to(device).requires_grad_() for t in (l1, l2, alpha)]
    out, got = _grads(lambda a, b, c: mix_logits(a, b, c, backend=backend), ins,
                      logits((2, 200), seed=3).to(device))
    assert torch.isfinite(out).all()
    assert torch.isfinite(got[0]).all() and (got[1] == 0).all()


def test_three_models_backward(device, backend):
    ls = [logits((3, 777), dt, seed=i) for i, dt in enumerate(
        (torch.float32, torch.float32, torch.float32))]
    ls[1][:, :6] = NEG_INF
    w = torch.softmax(logits((3, 3), seed=5), -1)
    g = logits((3, 777), seed=6)
    ins = [t.detach().to(device).requires_grad_() for t in (*ls, w)]
    _, got = _grads(lambda a, b, c, d: mix_logits_many([a, b, c], d, backend=backend,
                                                       n_valid=700), ins, g.to(device))
    rins = [t.detach().double().requires_grad_() for t in (*ls, w)]
    _, want = _grads(lambda a, b, c, d: mix_logits_many_reference(
        [a[:, :700], b[:, :700], c[:, :700]], list(d.unbind(-1))), rins, g[:, :700])
    for k in range(3):
        assert_close_grad(got[k].cpu(), want[k], torch.float32)
        assert (got[k][:, 700:] == 0).all()
    assert_close_grad(got[3].cpu(), want[3], torch.float32)


def test_float_alpha_and_leading_dims_backward(device, backend):
    l1 = logits((2, 3, 257), torch.bfloat16, seed=1).detach().to(device).requires_grad_()
    l2 = logits((2, 3, 257), torch.bfloat16, seed=2).detach().to(device).requires_grad_()
    out = mix_logits(l1, l2, 0.7, backend=backend)
    g = logits((2, 3, 257), seed=3)
    out.backward(g.to(device))
    r1 = l1.detach().double().cpu().requires_grad_()
    r2 = l2.detach().double().cpu().requires_grad_()
    mix_logits_many_reference([r1, r2], [0.7, 0.3]).backward(g.double())
    assert_close_grad(l1.grad.cpu(), r1.grad, torch.bfloat16)
    assert_close_grad(l2.grad.cpu(), r2.grad, torch.bfloat16)


def test_triton_backward_matches_torch_backward(device):
    pytest.importorskip("triton")
    l1, l2 = hard_pair(rows=3, V=1500, dtype=torch.bfloat16)
    alpha = torch.tensor([0.25, 0.0, 0.75])
    g = logits((3, 1500), seed=4)
    grads = {}
    for backend in ("torch", "triton"):
        ins = [t.detach().to(device).requires_grad_() for t in (l1, l2, alpha)]
        _, grads[backend] = _grads(lambda a, b, c: mix_logits(a, b, c, backend=backend),
                                   ins, g.to(device))
    for a, b in zip(grads["triton"], grads["torch"]):
        assert_close_grad(a.cpu(), b.cpu().double(), torch.bfloat16)
