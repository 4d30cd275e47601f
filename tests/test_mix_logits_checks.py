"""mix_logits / mix_logits_many argument checking: every bad argument raises one ModkernError
subclass whose message names the argument and what was expected; and the price of checking:
a tensor alpha with check=False is never read on the host (no synchronisation, so a decoding
step can be captured in a CUDA graph), while check=True still refuses bad values."""

from __future__ import annotations

import sys

import pytest
import torch
from mix_cases import assert_close_out, logits

from modkern import (AlphaError, BackendError, DTypeError, ModkernError, OptionError,
                     ShapeMismatchError, mix_logits, mix_logits_many)
from modkern.ops.mix_reference import mix_logits_many_reference

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

L = torch.zeros(2, 5)


def _bad_calls():
    """(id, call, error class, text the message must hold)."""
    sparse = L.to_sparse()
    meta = torch.zeros(2, 5, device="meta")
    f8 = L.to(torch.float8_e4m3fn)
    yield "vocab", lambda: mix_logits(L, L, 0.5, vocab="bogus"), OptionError, \
        r"vocab must be one of \('strict', 'common'\).*'bogus'"
    yield "vocab-type", lambda: mix_logits(L, L, 0.5, vocab=None), OptionError, "vocab"
    yield "vocab-many", lambda: mix_logits_many([L, L], [0.5, 0.5], vocab="union"), \
        OptionError, "vocab must be one of"
    yield "vocab_start", lambda: mix_logits(L, L, 0.5, vocab_start=3), OptionError, \
        "vocab_start=.*only meaningful with group="
    yield "check", lambda: mix_logits(L, L, 0.5, check="no"), OptionError, \
        "check must be True or False"
    yield "group", lambda: mix_logits(L, L, 0.5, group="world"), OptionError, "group"
    yield "backend", lambda: mix_logits(L, L, 0.5, backend="gpu"), BackendError, "backend"
    for bad in (1.5, "3", True, 0, 6, torch.tensor(3)):
        yield f"n_valid={bad!r}", lambda bad=bad: mix_logits(L, L, 0.5, n_valid=bad), \
            ShapeMismatchError, r"n_valid must be an int in \[1, 5\]"
    for bad in (None, "0.5", True, float("nan"), -0.1, [0.5]):
        yield f"alpha={bad!r}", lambda bad=bad: mix_logits(L, L, bad), AlphaError, "alpha"
    yield "alpha-int-tensor", lambda: mix_logits(L, L, torch.tensor([1, 0])), AlphaError, \
        "alpha must be a floating-point tensor, got dtype torch.int64"
    yield "alpha-nan-tensor", lambda: mix_logits(L, L, torch.tensor([0.5, float("nan")])), \
        AlphaError, r"alpha must lie in \[0, 1\], got nan \(at index \(1,\)\)"
    yield "alpha-device", lambda: mix_logits(L, L, torch.zeros(2, device="meta")), \
        AlphaError, "alpha is on meta but the logits are on cpu"
    yield "alpha-sparse", lambda: mix_logits(L, L, torch.zeros(2).to_sparse()), AlphaError, \
        "alpha must be a dense tensor"
    yield "weights-none", lambda: mix_logits_many([L, L], None), AlphaError, \
        "weights must be a sequence of 2 numbers or tensors"
    yield "weights-float", lambda: mix_logits_many([L, L], 0.5), AlphaError, \
        "weights must be a sequence"
    yield "weights-item", lambda: mix_logits_many([L, L], [0.5, "x"]), AlphaError, \
        r"weights\[1\]"
    yield "weights-device", lambda: mix_logits_many([L, L], [torch.zeros(2, device="meta"),
                                                             0.5]), \
        AlphaError, r"weights\[0\] is on meta"
    yield "weights-rows", lambda: mix_logits_many([L, L], torch.tensor([[0.5, 0.5], [1.0, 0.5]])), \
        AlphaError, "sum to 1 in every row; one row sums to 1.5"
    yield "weights-bool", lambda: mix_logits_many([L, L], torch.tensor([True, False])), \
        AlphaError, "floating-point tensor"
    yield "logits-int", lambda: mix_logits_many(5, [1.0]), DTypeError, \
        "logits must be a sequence .* got int"
    yield "logits-tensor", lambda: mix_logits_many(torch.zeros(2, 2, 5), [0.5, 0.5]), \
        DTypeError, "logits must be a sequence"
    yield "logits-empty", lambda: mix_logits_many([], []), ShapeMismatchError, \
        "at least one logits tensor"
    yield "logits-list", lambda: mix_logits([[0.0, 1.0]], L, 0.5), DTypeError, \
        "l1 is a list, expected a torch.Tensor"
    yield "logits-sparse", lambda: mix_logits(sparse, L, 0.5), DTypeError, \
        "l1 has layout torch.sparse_coo, expected a dense tensor"
    yield "logits-meta", lambda: mix_logits(L, meta, 0.5), BackendError, \
        "l2 is on the meta device"
    yield "logits-float8", lambda: mix_logits(f8, L, 0.5), DTypeError, \
        "l1 has dtype torch.float8_e4m3fn, expected floating-point logits"
    yield "logits-complex", lambda: mix_logits(L, L.to(torch.complex64), 0.5), DTypeError, \
        "l2 has dtype torch.complex64"


BAD = list(_bad_calls())


@pytest.mark.parametrize("call,error,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_each_bad_argument_raises_one_modkern_error(call, error, text):
    with pytest.raises(error, match=text) as info:
        call()
    assert isinstance(info.value, ModkernError)


# ---------------------------------------------------------------- host synchronisation

_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
               "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Calls that read a tensor's values on the host (each a synchronisation on a GPU),
    made from modkern's own code: a list filled as they happen."""
    seen = []

    def counting(name, orig):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("modkern"):
                seen.append(f"{caller}: {name}")
            return orig(*args, **kwargs)
        return wrapper

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("nonzero", "unique", "masked_select"):
        monkeypatch.setattr(torch, name, counting(name, getattr(torch, name)))
    return seen


def _pair():
    return logits((3, 700), seed=1), logits((3, 700), seed=2)


def test_tensor_alpha_unchecked_is_never_read_on_the_host(host_reads):
    """The Triton path with check=False, forward and backward: no host read at all."""
    pytest.importorskip("triton")
    l1, l2 = (t.requires_grad_() for t in _pair())
    alpha = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    out = mix_logits(l1, l2, alpha, backend="triton", check=False)
    out.sum().backward()
    many = mix_logits_many([l1, l2, l1], torch.full((3, 3), 1 / 3), backend="triton",
                           check=False)
    assert host_reads == []
    assert_close_out(out.detach(), mix_logits_many_reference(
        [l1.detach().double(), l2.detach().double()], [alpha.detach().double(),
                                                         1 - alpha.detach().double()]))
    assert torch.isfinite(many).all() and torch.isfinite(alpha.grad).all()


def test_checked_tensor_alpha_is_read_and_refused(host_reads):
    """The hook does see a check (check=True reads the values once), and bad values still
    raise there."""
    l1, l2 = _pair()
    mix_logits(l1, l2, torch.tensor([0.2, 0.5, 0.9]), backend="torch")
    assert any("__bool__" in r for r in host_reads)
    with pytest.raises(AlphaError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        mix_logits(l1, l2, torch.tensor([0.2, 1.5, 0.9]))
    with pytest.raises(AlphaError, match="sum to 1"):
        mix_logits_many([l1, l2], torch.tensor([0.6, 0.6]))


def test_unchecked_bad_values_are_not_refused_but_stay_visible():
    """check=False trusts the caller: a weight above 1 is not an error, and gives NaN
    (log of a negative mixture) where 1 - alpha < 0, not a plausible wrong answer."""
    l1, l2 = _pair()
    out = mix_logits(l1, l2, torch.tensor([0.5, 1.5, 0.5]), check=False, backend="torch")
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()


def test_capture_reads_nothing_on_the_host(monkeypatch, host_reads):
    """While a CUDA graph is captured nothing can be read on the host, and checking the
    capture-time values would prove nothing about a replay's: the values are not read,
    with or without check (simulated capture: the CPU tensors run as usual)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    l1, l2 = _pair()
    alpha = torch.tensor([0.2, 0.5, 0.9])
    out = mix_logits(l1, l2, alpha, backend="triton")
    many = mix_logits_many([l1, l2], torch.stack([alpha, 1 - alpha], -1), backend="triton")
    assert host_reads == []
    assert torch.equal(out, many)
