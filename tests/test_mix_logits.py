"""mix_logits / mix_logits_many forward values against the float64 reference (docs/design.md 1.2),
the edge cases it names, the vocabulary options and the validation errors.
Tolerances are written down and justified in mix_cases.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mix_cases import DTYPES, NEG_INF, assert_close_out, backend_fixture, hard_pair, logits

import modkern
from modkern import (AlphaError, BackendError, DTypeError, OptionError, ShapeMismatchError,
                     mix_logits, mix_logits_many)
from modkern.ops.mix_reference import mix_logits_many_reference, mix_logits_reference

# The Triton interpreter evaluates masked lanes in numpy too (-inf - -inf, log 0): harmless.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
mix_backend = backend_fixture()


def ref(l1, l2, alpha):
    a = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    return mix_logits_reference(l1.double(), l2.double(), a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.3, 1e-6, 1 - 1e-6, "rows"])
def test_hard_cases_match_reference(device, backend, dtype, alpha):
    l1, l2 = hard_pair(rows=5, V=1031, dtype=dtype)
    l1, l2 = l1.to(device), l2.to(device)
    if alpha == "rows":  # per-row alpha with both ends and a tiny weight
        alpha = torch.tensor([0.0, 1.0, 1e-6, 0.5, 0.9], device=device)
    out = mix_logits(l1, l2, alpha, backend=backend)
    assert out.dtype == torch.float32 and out.shape == l1.shape
    assert_close_out(out.cpu(), ref(l1.cpu(), l2.cpu(), alpha.cpu() if
                                    isinstance(alpha, torch.Tensor) else alpha))
    assert (out[:, 1:3] == NEG_INF).all()  # masked in both: -inf, never NaN


@pytest.mark.parametrize("alpha,model", [(1.0, 0), (0.0, 1)])
def test_alpha_end_is_exactly_log_softmax(device, backend, alpha, model):
    l1, l2 = hard_pair(rows=4, V=517, dtype=torch.bfloat16)
    pair = [l1.to(device), l2.to(device)]
    pair[1 - model][0] = float("nan")  # the dropped model cannot leak into the result
    out = mix_logits(*pair, alpha, backend=backend)
    assert torch.equal(out, torch.log_softmax(pair[model].float(), dim=-1))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_per_row_alpha_end_drops_the_other_model(device, backend, alpha):
    l1, l2 = logits((3, 301), seed=3).to(device), logits((3, 301), seed=4).to(device)
    dropped = l2 if alpha == 1.0 else l1
    dropped[1] = float("nan")
    dropped[2] = NEG_INF
    a = torch.full((3,), alpha, device=device)
    kept = l1 if alpha == 1.0 else l2
    out = mix_logits(l1, l2, a, backend=backend)
    assert_close_out(out.cpu(), torch.log_softmax(kept.cpu().double(), dim=-1))


def test_nan_rows_follow_log_softmax(device, backend):
    l1, l2 = logits((4, 200), seed=5).to(device), logits((4, 200), seed=6).to(device)
    l1[0] = NEG_INF           # all -inf: log_softmax gives NaN
    l1[1, 17] = float("nan")  # a NaN inside
    l1[2, 3] = float("inf")   # +inf: log_softmax gives NaN too
    out = mix_logits(l1, l2, 0.5, backend=backend)
    assert torch.isnan(out[:3]).all()
    assert torch.isfinite(out[3]).all()


@pytest.mark.parametrize("V", [1, 2, 3, 1000, 1025, 2999])
def test_odd_widths_and_leading_shapes(device, backend, V):
    l1 = logits((2, 3, V), torch.bfloat16, seed=V).to(device)
    l2 = logits((2, 3, V), torch.float16, seed=V + 1).to(device)  # dtypes may differ
    alpha = torch.rand(3, generator=torch.Generator().manual_seed(V)).to(device)  # broadcast
    out = mix_logits(l1, l2, alpha, backend=backend)
    assert out.shape == (2, 3, V)
    assert_close_out(out.cpu(), ref(l1.cpu(), l2.cpu(), alpha.cpu()))


def test_three_models_per_row_weights(device, backend):
    ls = [logits((2, 4, 777), dt, seed=i).to(device)
          for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16))]
    ls[0][..., :4] = NEG_INF
    ls[2][0, 1, :] -= 500.0
    w = torch.softmax(logits((2, 4, 3), seed=9), dim=-1)
    w[0, 0] = torch.tensor([0.0, 1.0, 0.0])
    w[1, 3] = torch.tensor([0.5, 0.0, 0.5])
    out = mix_logits_many(ls, w.to(device), backend=backend)
    want = mix_logits_many_reference([t.cpu().double() for t in ls], list(w.double().unbind(-1)))
    assert_close_out(out.cpu(), want)


def test_many_with_float_weights_and_k1(device, backend):
    ls = [logits((3, 129), seed=i).to(device) for i in range(3)]
    out = mix_logits_many(ls, [0.2, 0.0, 0.8], backend=backend)
    want = mix_logits_many_reference([t.cpu().double() for t in ls], [0.2, 0.0, 0.8])
    assert_close_out(out.cpu(), want)
    one = mix_logits_many(ls[:1], [1.0], backend=backend)
    assert torch.equal(one, torch.log_softmax(ls[0], dim=-1))


def test_two_way_is_many_with_alpha_pair(device, backend):
    l1, l2 = hard_pair(rows=3, V=300)
    a = mix_logits(l1.to(device), l2.to(device), 0.25, backend=backend)
    b = mix_logits_many([l1.to(device), l2.to(device)], [0.25, 0.75], backend=backend)
    assert torch.equal(a, b)


def test_non_contiguous_inputs(device, backend):
    base1 = logits((6, 2, 801), torch.bfloat16, seed=1).to(device)
    base2 = logits((801, 6), torch.float32, seed=2).to(device)
    l1 = base1[::2, 1]   # rows strided
    l2 = base2.t()[::2]  # columns strided: the kernels need a copy, torch does not
    assert not l1.is_contiguous() and l2.stride(-1) != 1
    alpha = torch.tensor([0.1, 0.5, 0.9], device=device)[:, None].expand(3, 1)[:, 0]
    out = mix_logits(l1, l2, alpha, backend=backend)
    assert_close_out(out.cpu(), ref(l1.cpu(), l2.cpu(), alpha.cpu()))


# ---------------------------------------------------------------- vocabularies


def test_strict_vocab_mismatch_names_both_widths(device):
    l1, l2 = torch.zeros(2, 151936, device=device), torch.zeros(2, 152064, device=device)
    with pytest.raises(ShapeMismatchError, match="151936.*152064"):
        mix_logits(l1, l2, 0.5)


def test_common_vocab_keeps_the_prefix(device, backend):
    l1, l2 = logits((3, 1000), seed=1).to(device), logits((3, 1100), seed=2).to(device)
    out = mix_logits(l1, l2, 0.4, backend=backend, vocab="common")
    assert out.shape == (3, 1000)
    assert_close_out(out.cpu(), ref(l1.cpu(), l2[:, :1000].cpu(), 0.4))


@pytest.mark.parametrize("alpha", [0.6, 1.0, "rows"])
def test_n_valid_masks_padded_columns(device, backend, alpha):
    l1, l2 = logits((3, 1000), seed=1).to(device), logits((3, 1000), seed=2).to(device)
    a = torch.tensor([0.0, 0.5, 1.0], device=device) if alpha == "rows" else alpha
    out = mix_logits(l1, l2, a, backend=backend, n_valid=937)
    a = a.cpu() if isinstance(a, torch.Tensor) else a
    want = torch.cat([ref(l1[:, :937].cpu(), l2[:, :937].cpu(), a),
                      torch.full((3, 63), NEG_INF, dtype=torch.float64)], dim=1)
    assert_close_out(out.cpu(), want)


def test_common_and_n_valid_together(device, backend):
    l1, l2 = logits((2, 300), seed=1).to(device), logits((2, 320), seed=2).to(device)
    out = mix_logits(l1, l2, 0.5, backend=backend, vocab="common", n_valid=250)
    assert out.shape == (2, 300) and (out[:, 250:] == NEG_INF).all()
    assert_close_out(out[:, :250].cpu(), ref(l1[:, :250].cpu(), l2[:, :250].cpu(), 0.5))


# ---------------------------------------------------------------- properties


@given(rows=st.integers(1, 3), V=st.integers(1, 300),
       alpha=st.floats(0.0, 1.0), scale=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2 ** 16))
def test_output_is_the_mixture_and_a_log_distribution(rows, V, alpha, scale, seed):
    l1 = logits((rows, V), scale=scale, seed=seed)
    l2 = logits((rows, V), scale=scale, seed=seed + 1)
    out = mix_logits(l1, l2, alpha, backend="torch").double()
    mixture = alpha * torch.softmax(l1.double(), -1) + (1 - alpha) * torch.softmax(
        l2.double(), -1)
    assert torch.allclose(torch.softmax(out, -1), mixture, rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.logsumexp(out, -1), torch.zeros(rows, dtype=torch.float64),
                          atol=1e-5)
    # the mixture lies between its parts: min_k lp_k <= out <= max_k lp_k
    lp = torch.stack([torch.log_softmax(l1.double(), -1), torch.log_softmax(l2.double(), -1)])
    slack = 1e-5 + 1e-6 * out.abs()  # float32 rounding of log-probs far below 0
    assert (out <= lp.max(0).values + slack).all() and (out >= lp.min(0).values - slack).all()


@given(V=st.integers(1, 2100), k=st.integers(1, 4), seed=st.integers(0, 2 ** 16),
       masked=st.integers(0, 5))
def test_triton_matches_reference_random(V, k, seed, masked):
    pytest.importorskip("triton")
    ls = [logits((2, V), seed=seed + i) for i in range(k)]
    for t in ls:
        t[:, :min(masked, V - 1)] = NEG_INF
    w = torch.softmax(logits((2, k), seed=seed), -1)
    out = mix_logits_many([t.to(modkern_device()) for t in ls], w.to(modkern_device()),
                          backend="triton")
    want = mix_logits_many_reference([t.double() for t in ls], list(w.double().unbind(-1)))
    assert_close_out(out.cpu(), want)


def modkern_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_one_clear_error(device):
    l1, l2 = torch.zeros(2, 5, device=device), torch.zeros(2, 5, device=device)
    with pytest.raises(AlphaError, match="1.5"):
        mix_logits(l1, l2, 1.5)
    with pytest.raises(AlphaError, match="alpha"):
        mix_logits(l1, l2, torch.tensor([0.5, -0.1], device=device))
    with pytest.raises(AlphaError, match="sum to 1"):
        mix_logits_many([l1, l2], [0.5, 0.6])
    with pytest.raises(AlphaError, match="sum to 1"):
        mix_logits_many([l1, l2], torch.tensor([[0.5, 0.5], [0.5, 0.4]], device=device))
    with pytest.raises(ShapeMismatchError, match="2 weights"):
        mix_logits_many([l1, l2, l2], [0.5, 0.5])
    with pytest.raises(DTypeError, match="int64"):
        mix_logits(l1, torch.zeros(2, 5, dtype=torch.long, device=device), 0.5)
    with pytest.raises(ShapeMismatchError, match=r"\[2, 5\].*\[3, 5\]"):
        mix_logits(l1, torch.zeros(3, 5, device=device), 0.5)
    with pytest.raises(ShapeMismatchError, match="broadcast"):
        mix_logits(l1, l2, torch.full((3,), 0.5, device=device))
    with pytest.raises(ShapeMismatchError, match="n_valid"):
        mix_logits(l1, l2, 0.5, n_valid=6)
    with pytest.raises(OptionError, match="vocab"):
        mix_logits(l1, l2, 0.5, vocab="union")
    assert modkern.mix_logits is mix_logits


def test_triton_backend_refuses_float64_and_many_models(device):
    pytest.importorskip("triton")
    l = torch.zeros(2, 5, dtype=torch.float64, device=device)
    with pytest.raises(BackendError, match="float64"):
        mix_logits(l, l, 0.5, backend="triton")
    ls = [torch.zeros(2, 5, device=device)] * 5
    with pytest.raises(BackendError, match="up to 4"):
        mix_logits_many(ls, [0.2] * 5, backend="triton")
    # "auto" picks the backend that runs them
    assert torch.isfinite(mix_logits_many(ls, [0.2] * 5)).all()


def test_empty_rows(device, backend):
    l = torch.zeros(0, 7, device=device)
    assert mix_logits(l, l, 0.5, backend=backend).shape == (0, 7)


def test_weight_sum_is_checked_on_every_weight():
    l1, l2, l3 = (torch.randn(2, 5) for _ in range(3))
    with pytest.raises(AlphaError, match=r"\[0\.0, 0\.0\]"):
        modkern.mix_logits_many([l1, l2], [0.0, 0.0])
    with pytest.raises(AlphaError, match=r"\[0\.5, 0\.0, 0\.3\]"):
        modkern.mix_logits_many([l1, l2, l3], [0.5, 0.0, 0.3])
