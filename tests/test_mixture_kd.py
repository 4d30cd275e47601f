"""mixture_kd_loss and fused_linear_mixture_kd on the torch engine: a hand-worked case,
the float64 reference for every kind x temperature x mask x vocabulary case, gradcheck,
the fused form against the unfused one, and the edges (masked rows and columns, weights
of 0, chunking, dtypes, layouts)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kd_cases import (F32, F32_GRAD, KINDS, NEG_INF, assert_grad_close, assert_loss_close,
                      randn, teachers)

import modkern
from modkern import fused_linear_mixture_kd, mixture_kd_loss
from modkern.ops.kd_reference import mixture_kd_reference

W2 = [0.3, 0.7]
TEMPERATURES = (1.0, 0.5, 2.5)
MASKS = ("none", "bool", "labels")
VOCABS = ("same", "student wider", "teacher wider")


def _mask(kind: str, rows: int):
    keep = torch.tensor([i % 3 != 1 for i in range(rows)])
    if kind == "none":
        return None, None
    if kind == "bool":
        return keep, keep
    labels = torch.where(keep, torch.arange(rows) + 5, torch.full((rows,), -100))
    return labels, keep


def _widths(vocab: str, V: int) -> tuple[int, int, int]:
    """(student, teacher 1, teacher 2) widths."""
    return {"same": (V, V, V), "student wider": (V + 9, V, V + 4),
            "teacher wider": (V, V + 7, V + 3)}[vocab]


def _reference(s, ts, weights, keep, **kw):
    s = s.detach().clone().requires_grad_()
    loss = mixture_kd_reference(s, ts, weights, mask=keep, **kw)
    loss.backward()
    return loss.detach(), s.grad


# ---------------------------------------------------------------- hand-worked

def test_hand_worked_two_teachers():
    """p = 0.5 [0.5, 0.5] + 0.5 [0.9, 0.1] = [0.7, 0.3]; q = [0.6, 0.4]; a third column
    masked in both teachers is out of every sum, whatever the student puts there."""
    t1 = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    t2 = torch.log(torch.tensor([[0.9, 0.1, 0.0]], dtype=torch.float64))
    s = torch.log(torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64))
    s[0, 2] = 5.0  # ignored
    fwd = 0.7 * math.log(0.7 / 0.6) + 0.3 * math.log(0.3 / 0.4)
    rev = 0.6 * math.log(0.6 / 0.7) + 0.4 * math.log(0.4 / 0.3)
    jsd = 0.5 * (0.7 * math.log(0.7 / 0.65) + 0.3 * math.log(0.3 / 0.35)
                 + 0.6 * math.log(0.6 / 0.65) + 0.4 * math.log(0.4 / 0.35))
    for kind, want in (("forward_kl", fwd), ("reverse_kl", rev), ("jsd", jsd)):
        x = s.clone().requires_grad_()
        loss = mixture_kd_loss(x, [t1, t2], [0.5, 0.5], kind=kind)
        assert loss.item() == pytest.approx(want, abs=1e-15)
        loss.backward()
        assert x.grad[0, 2] == 0.0
        if kind == "forward_kl":  # q - p
            assert x.grad[0, :2].tolist() == pytest.approx([-0.1, 0.1], abs=1e-15)
    # temperature 2 and T^2: softmax(log(x) / 2) is sqrt(x) renormalised
    x = s.clone().requires_grad_()
    loss = mixture_kd_loss(x, [t1, t2], [0.5, 0.5], temperature=2.0, scale_t2=True)
    pa = [0.5 * math.sqrt(a) / (math.sqrt(0.5) * 2) + 0.5 * math.sqrt(b) / (math.sqrt(0.9)
                                                                          + math.sqrt(0.1))
          for a, b in ((0.5, 0.9), (0.5, 0.1))]
    qa = [math.sqrt(a) / (math.sqrt(0.6) + math.sqrt(0.4)) for a in (0.6, 0.4)]
    want = 4.0 * sum(p * math.log(p / q) for p, q in zip(pa, qa))
    assert loss.item() == pytest.approx(want, abs=1e-14)


# ---------------------------------------------------------------- every case, float64

@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_every_case(kind, temperature, mask, vocab):
    rows, V = 7, 41
    ws, w1, w2 = _widths(vocab, V)
    s = randn((rows, ws), seed=0)
    ts = teachers(rows, (w1, w2))
    m, keep = _mask(mask, rows)
    want, want_grad = _reference(s, ts, W2, keep, temperature=temperature, kind=kind)
    x = s.clone().requires_grad_()
    got = mixture_kd_loss(x, ts, W2, temperature=temperature, kind=kind, mask=m,
                          chunk_rows=3)
    got.backward()
    assert torch.isfinite(want)
    assert_loss_close(got, want)
    assert_grad_close(x.grad, want_grad)
    assert (x.grad[:, V:] == 0).all() and (x.grad[:, 1:3] == 0).all()
    if keep is not None:
        assert (x.grad[~keep] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_float32_inputs_match_float64_reference(kind):
    s = randn((9, 300), seed=3, dtype=torch.float32)
    ts = [t.float() for t in teachers(9, (300, 300))]
    want, want_grad = _reference(s.double(), [t.double() for t in ts], W2, None, kind=kind,
                                 temperature=1.5)
    x = s.clone().requires_grad_()
    got = mixture_kd_loss(x, ts, W2, kind=kind, temperature=1.5)
    got.backward()
    assert got.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_loss_close(got, want, **F32)
    assert_grad_close(x.grad, want_grad, **F32_GRAD)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    s = randn((5, 13), seed=4, scale=1.0).requires_grad_()
    ts = teachers(5, (13, 15))
    keep = torch.tensor([True, False, True, True, True])

    def f(x):
        return mixture_kd_loss(x, ts, W2, kind=kind, temperature=1.7, mask=keep,
                               chunk_rows=2)
    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fused(kind):
    h = randn((2, 3, 6), seed=5, scale=1.0).requires_grad_()
    w = randn((13, 6), seed=6, scale=1.0).requires_grad_()
    b = randn((13,), seed=7, scale=1.0).requires_grad_()
    th, tw = randn((2, 3, 4), seed=8), randn((12, 4), seed=9)
    t2 = teachers(6, (14, 14))[1].view(2, 3, 14)

    def f(h, w, b):
        return fused_linear_mixture_kd(h, w, [(th, tw), t2], [0.4, 0.6], bias=b, kind=kind,
                                       temperature=0.8, chunk_rows=4)
    assert torch.autograd.gradcheck(f, (h, w, b))


# ---------------------------------------------------------------- fused = unfused

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask", MASKS)
def test_fused_equals_unfused(kind, mask):
    rows, H, V = 10, 8, 37
    h = randn((2, rows // 2, H), seed=10, scale=1.0)
    w, b = randn((V, H), seed=11, scale=1.0), randn((V,), seed=12)
    th, tw, tb = randn((2, rows // 2, 6), seed=13), randn((V + 3, 6), seed=14), randn(
        (V + 3,), seed=15)
    t2 = teachers(rows, (V,))[0].view(2, rows // 2, V)
    m, _ = _mask(mask, rows)
    m = None if m is None else m.view(2, rows // 2)
    opts = dict(kind=kind, temperature=1.3, mask=m, scale_t2=True)

    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    t1_logits = th @ tw.T + tb
    want = mixture_kd_loss(leaves[0] @ leaves[1].T + leaves[2], [t1_logits, t2], W2, **opts)
    (want * 3).backward()
    fused = [x.clone().requires_grad_() for x in (h, w, b)]
    got = fused_linear_mixture_kd(fused[0], fused[1], [(th, tw, tb), t2], W2, bias=fused[2],
                                  chunk_rows=3, **opts)
    (got * 3).backward()
    assert_loss_close(got, want)
    for g, r in zip(fused, leaves):
        assert_grad_close(g.grad, r.grad)


def test_fused_gradients_only_where_asked():
    h = randn((6, 5), seed=1).requires_grad_()
    w = randn((20, 5), seed=2)  # a frozen head
    loss = fused_linear_mixture_kd(h, w, [randn((6, 20), seed=3)], [1.0])
    loss.backward()
    ref = h.detach().clone().requires_grad_()
    mixture_kd_loss(ref @ w.T, [randn((6, 20), seed=3)], [1.0]).backward()
    assert_grad_close(h.grad, ref.grad)
    with torch.no_grad():
        assert fused_linear_mixture_kd(h, w, [randn((6, 20), seed=3)], [1.0]).requires_grad \
            is False


def test_fused_bf16_head_accumulates_in_float32():
    h = randn((12, 16), seed=1, scale=1.0, dtype=torch.bfloat16).requires_grad_()
    w = randn((50, 16), seed=2, scale=0.5, dtype=torch.bfloat16).requires_grad_()
    t = randn((12, 50), seed=3)
    loss = fused_linear_mixture_kd(h, w, [t.float()], [1.0], chunk_rows=5)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = mixture_kd_reference(h64 @ w64.T, [t], [1.0])
    want.backward()
    assert_loss_close(loss, want, rtol=2e-2)  # bf16 matmul
    assert_grad_close(w.grad, w64.grad, rtol=3e-2)


# ---------------------------------------------------------------- edges

@pytest.mark.parametrize("fused", [False, True])
def test_all_rows_masked_gives_zero(fused):
    s = randn((4, 10), seed=1).requires_grad_()
    t = randn((4, 10), seed=2)
    t[:] = float("nan")  # never read: no row counts
    mask = torch.zeros(4, dtype=torch.bool)
    if fused:
        w = randn((10, 10), seed=3).requires_grad_()
        loss = fused_linear_mixture_kd(s, w, [t], [1.0], mask=mask)
    else:
        loss = mixture_kd_loss(s, [t], [1.0], mask=mask, kind="jsd")
    loss.backward()
    assert loss.item() == 0.0
    assert (s.grad == 0).all()


def test_empty_batch_gives_zero():
    s = torch.zeros(0, 7, dtype=torch.float64, requires_grad=True)
    loss = mixture_kd_loss(s, [torch.zeros(0, 7)], [1.0])
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, 7)


def test_masked_rows_and_zero_weight_teachers_are_never_read():
    s = randn((3, 8), seed=1)
    t1, t2 = randn((3, 8), seed=2), randn((3, 8), seed=3)
    t1[1] = float("nan")
    t2[:] = float("nan")  # weight 0: dropped
    keep = torch.tensor([True, False, True])
    got = mixture_kd_loss(s, [t1, t2], [1.0, 0.0], mask=keep, kind="reverse_kl")
    want = mixture_kd_reference(s[keep], [t1[keep]], [1.0], kind="reverse_kl")
    assert_loss_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_columns_masked_in_every_teacher(kind):
    """Reverse KL stays finite; the student's logits there change nothing."""
    s = randn((4, 12), seed=1)
    ts = teachers(4, (12, 12))
    a = mixture_kd_loss(s, ts, W2, kind=kind)
    s2 = s.clone()
    s2[:, 1:3] = torch.tensor([50.0, NEG_INF])
    assert torch.isfinite(a)
    assert mixture_kd_loss(s2, ts, W2, kind=kind).item() == pytest.approx(a.item(), rel=1e-12)


def test_row_without_teacher_mass_is_nan_unless_masked():
    s, t = randn((2, 5), seed=1), randn((2, 5), seed=2)
    t[0] = NEG_INF
    assert torch.isnan(mixture_kd_loss(s, [t], [1.0]))
    assert torch.isfinite(mixture_kd_loss(s, [t], [1.0], mask=torch.tensor([False, True])))


def test_non_contiguous_and_batched_inputs():
    s = randn((12, 3, 4), seed=1).permute(2, 1, 0)  # [4, 3, 12], columns strided
    ts = [randn((4, 3, 15), seed=2)[..., :12], randn((4, 3, 12), seed=3)]
    keep = torch.rand(4, 3, generator=torch.Generator().manual_seed(0)) > 0.3
    x = s.clone().requires_grad_()
    got = mixture_kd_loss(s.requires_grad_(), ts, W2, mask=keep, chunk_rows=5)
    got.backward()
    want, want_grad = _reference(x.detach().contiguous(), ts, W2, keep)
    assert_loss_close(got, want)
    assert_grad_close(s.grad, want_grad)


def test_bf16_student_gets_a_bf16_gradient():
    s = randn((5, 64), seed=1, dtype=torch.bfloat16).requires_grad_()
    t = randn((5, 64), seed=2, dtype=torch.float16)
    loss = mixture_kd_loss(s, [t], [1.0], kind="jsd")
    loss.backward()
    want, want_grad = _reference(s.double(), [t.double()], [1.0], None, kind="jsd")
    assert s.grad.dtype == torch.bfloat16
    assert_loss_close(loss, want, **F32)
    assert_grad_close(s.grad, want_grad, rtol=2 ** -7)


def test_weights_tensor_and_many_teachers():
    s = randn((3, 9), seed=1)
    ts = [randn((3, 9), seed=k) for k in range(2, 7)]
    w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    got = mixture_kd_loss(s, ts, w, kind="jsd")
    assert_loss_close(got, mixture_kd_reference(s, ts, w.tolist(), kind="jsd"))


@given(st.integers(1, 6), st.integers(2, 30), st.sampled_from(KINDS),
       st.floats(0.25, 4.0), st.integers(0, 1000))
def test_properties(rows, V, kind, temperature, seed):
    """Divergences are >= 0, 0 when the student is the target, and JSD <= log 2."""
    t = randn((rows, V), seed=seed)
    s = randn((rows, V), seed=seed + 1)
    loss = mixture_kd_loss(s, [t], [1.0], kind=kind, temperature=temperature)
    assert loss.item() >= -1e-12
    if kind == "jsd":
        assert loss.item() <= math.log(2) + 1e-12
    same = mixture_kd_loss(t, [t, t * 1.0], [0.5, 0.5], kind=kind, temperature=temperature)
    assert abs(same.item()) <= 1e-12


# ---------------------------------------------------------------- bad input

def test_bad_weights():
    s, t = randn((2, 4), seed=1), randn((2, 4), seed=2)
    with pytest.raises(modkern.AlphaError, match="sum to 1"):
        mixture_kd_loss(s, [t, t], [0.5, 0.6])
    with pytest.raises(modkern.AlphaError, match=r"weights\[0\]"):
        mixture_kd_loss(s, [t, t], [-0.5, 1.5])
    with pytest.raises(modkern.ShapeMismatchError, match="2 teachers but 3 weights"):
        mixture_kd_loss(s, [t, t], [0.5, 0.25, 0.25])


def test_bad_shapes_name_the_tensor():
    s, t = randn((2, 3, 4), seed=1), randn((2, 3, 4), seed=2)
    with pytest.raises(modkern.ShapeMismatchError, match=r"teacher_logits\[1\]"):
        mixture_kd_loss(s, [t, t[:1]], W2)
    with pytest.raises(modkern.ShapeMismatchError, match="mask"):
        mixture_kd_loss(s, [t], [1.0], mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(modkern.ShapeMismatchError, match=r"student: weight"):
        fused_linear_mixture_kd(s, randn((5, 3), seed=3), [t], [1.0])
    with pytest.raises(modkern.ShapeMismatchError, match=r"student: bias"):
        fused_linear_mixture_kd(s, randn((5, 4), seed=3), [t], [1.0], bias=randn((4,), 1))
    with pytest.raises(modkern.ShapeMismatchError, match=r"teacher_logits\[0\]: weight"):
        mixture_kd_loss(s, [(s, randn((4, 5), seed=3))], [1.0])
    with pytest.raises(modkern.ShapeMismatchError, match=r"student_logits has 4.*"
                       r"teacher_logits\[0\] has 6"):
        mixture_kd_loss(s, [randn((2, 3, 6), seed=2)], [1.0], vocab="strict")
    with pytest.raises(modkern.ShapeMismatchError, match="list of K >= 1 teachers"):
        mixture_kd_loss(s, t, [1.0])


def test_bad_options():
    s, t = randn((2, 4), seed=1), randn((2, 4), seed=2)
    for opts, match in (({"temperature": 0.0}, "temperature"),
                        ({"temperature": float("inf")}, "temperature"),
                        ({"kind": "kl"}, "kind"), ({"vocab": "union"}, "vocab"),
                        ({"chunk_rows": 0}, "chunk_rows")):
        with pytest.raises(modkern.OptionError, match=match):
            mixture_kd_loss(s, [t], [1.0], **opts)
    with pytest.raises(modkern.DTypeError, match="student_logits"):
        mixture_kd_loss(s.long(), [t], [1.0])
    with pytest.raises(modkern.DTypeError, match="mask"):
        mixture_kd_loss(s, [t], [1.0], mask=torch.ones(2))
    with pytest.raises(modkern.BackendError):
        mixture_kd_loss(s, [t], [1.0], backend="cuda")


def test_backward_twice_with_retain_graph():
    s = randn((3, 6), seed=1).requires_grad_()
    loss = mixture_kd_loss(s, [randn((3, 6), seed=2)], [1.0])
    (loss * 2).backward(retain_graph=True)
    loss.backward()
    assert_grad_close(s.grad, 3 * _reference(s, [randn((3, 6), seed=2)], [1.0], None)[1])


def test_gradient_is_not_copied_into_grad():
    """Autograd takes the returned gradient as .grad (no second [N, V] tensor)."""
    s = randn((4, 50), seed=1).requires_grad_()
    seen = []
    s.register_hook(lambda g: seen.append(g.data_ptr()))
    mixture_kd_loss(s, [randn((4, 50), seed=2)], [1.0]).backward()
    assert seen == [s.grad.data_ptr()]
