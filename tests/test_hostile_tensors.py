"""Hostile tensors and arguments to the Python select API (the catalogue in
hostile_tensors.py, and its neighbours): each is refused by every form of the select
(mod_select, out=, mod_select_, merge_state_dicts out of place and in place) with one
ModkernError subclass naming the key, the model and what was expected, leaving every input
as it was; or, where the right answer is to work, gives the numpy oracle's result."""

from __future__ import annotations

import pytest
import torch

import modkern
from hostile_tensors import REFUSED, WORKS, base, needs_cuda, other
from modkern import AlphaError, DTypeError, ModkernError, OptionError, ShapeMismatchError
from oracle_select import assert_bits_equal, oracle_select

KEY = "model.layers.7.mlp.down_proj.weight"
FIRST = "model.layers.0.mlp.up_proj.weight"  # merged before KEY: must stay untouched


def fingerprint(t):
    """What must not change about a tensor, whatever its kind."""
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return repr(t) if not isinstance(t, torch.Tensor) else ("meta", tuple(t.shape))
    if t.is_nested:
        return [x.clone() for x in t.unbind()]
    if t.is_quantized:
        return [t.int_repr().clone()]
    if t.layout != torch.strided:
        return [t.to_dense().clone()]
    return [t.clone()]


def same(a, b) -> bool:
    if not isinstance(a, list):
        return a == b
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def forms(t1, t2, alpha, backend, in_place: bool):
    """(form name, call) for the forms that read t1 (out of place) or write it."""
    first1, first2 = base(64), other(64)
    if isinstance(t1, torch.Tensor) and t1.is_cuda:
        first1, first2 = first1.cuda(), first2.cuda()
    sd1, sd2 = {FIRST: first1, KEY: t1}, {FIRST: first2, KEY: t2}
    if not in_place:
        yield "mod_select", lambda: modkern.mod_select(t1, t2, alpha, backend=backend, name=KEY)
        dense = isinstance(t1, torch.Tensor) and not t1.is_nested and \
            t1.layout == torch.strided and t1.dtype.is_floating_point
        out = torch.empty(t1.shape, dtype=t1.dtype, device=t1.device) if dense else \
            torch.empty(1)
        yield "out=", lambda: modkern.mod_select(t1, t2, alpha, backend=backend, name=KEY,
                                                 out=out)
        yield "merge", lambda: modkern.merge_state_dicts(sd1, sd2, alpha, backend=backend)
    else:
        yield "mod_select_", lambda: modkern.mod_select_(t1, t2, alpha, backend=backend,
                                                         name=KEY)
        yield "merge inplace", lambda: modkern.merge_state_dicts(sd1, sd2, alpha,
                                                                 backend=backend, inplace=True)


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("in_place", [False, True], ids=["reads", "writes"])
def test_refused_tensor(name, in_place, backend):
    case = REFUSED[name]
    if needs_cuda(name) and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if case.in_place_only and not in_place:
        pytest.skip("only the forms that write t1 refuse it")
    t1, t2 = case.build()
    before = [fingerprint(t1), fingerprint(t2)]
    for form, call in forms(t1, t2, 0.9, backend, in_place):
        with pytest.raises(ModkernError) as e:
            call()
        msg = str(e.value)
        assert type(e.value) is case.error, (form, type(e.value), msg)
        assert KEY in msg and case.model in msg and "expected" in msg, (form, msg)
        for word in case.words:
            assert word in msg, (form, word, msg)
        assert "\n" not in msg
    assert same(fingerprint(t1), before[0]) and same(fingerprint(t2), before[1])


@pytest.mark.parametrize("name", sorted(WORKS))
def test_works_like_the_oracle(name, backend, device):
    t1, t2 = (t.to(device) for t in WORKS[name].build())
    expected = oracle_select(t1, t2, 0.9)
    writable = t1.numel() <= 1 or 0 not in t1.stride()
    for in_place in (False, True) if writable else (False,):
        for form, call in forms(t1.clone() if in_place else t1, t2, 0.9, backend, in_place):
            got = call()
            got = got[KEY] if isinstance(got, dict) else got
            assert_bits_equal(got, expected, f"{name} {form}")


def test_expanded_t2_is_read_only_where_selected(backend, device, monkeypatch):
    """An expanded t2 (stride 0) is not materialized: model 2 is read at the selected
    elements only, on every engine (small tensors packed on Triton are copied whole)."""
    from modkern.ops.select_source import TensorSource
    reads = []
    read = TensorSource.read

    def counted(self, flat_idx):
        reads.append(flat_idx.numel())
        return read(self, flat_idx)

    monkeypatch.setattr(TensorSource, "read", counted)
    t1 = base(3 * 4096 + 5).to(device).view(-1, 1).expand(-1, 7)[:, 0]  # t1 strided too
    t2 = torch.tensor([2.5], device=device).expand(t1.shape)
    expected = oracle_select(t1, t2, 0.97)
    taken = int((expected != t1).sum())
    assert 0 < taken < t1.numel() // 10
    assert_bits_equal(modkern.mod_select(t1, t2, 0.97, backend=backend), expected, "select")
    assert sum(reads) == taken


# ---- autograd: merges are data updates ----------------------------------------------------

def test_out_of_place_results_are_plain_tensors(backend, device):
    t1 = torch.nn.Parameter(base().to(device))
    t2 = other().to(device).requires_grad_()
    expected = oracle_select(t1, t2, 0.9)
    results = {
        "mod_select": modkern.mod_select(t1, t2, 0.9, backend=backend),
        "out=": modkern.mod_select(t1, t2, 0.9, backend=backend,
                                   out=torch.empty(t1.shape, device=device)),
        "merge": modkern.merge_state_dicts({KEY: t1}, {KEY: t2}, 0.9, backend=backend)[KEY],
    }
    for form, got in results.items():
        assert not got.requires_grad and got.grad_fn is None, form
        assert type(got) is torch.Tensor, form
        assert_bits_equal(got, expected, form)
    assert t1.grad is None and t2.grad is None
    out = torch.zeros(t1.shape, device=device, requires_grad=True)  # the caller's own flags
    assert modkern.mod_select(t1, t2, 0.9, backend=backend, out=out) is out
    assert out.requires_grad and out.grad_fn is None
    assert_bits_equal(out, expected, "out= that requires grad")


def test_in_place_into_parameters_is_a_data_update(backend, device):
    layer = torch.nn.Linear(64, 64).to(device)
    with torch.no_grad():
        layer.weight.copy_(base(4096).view(64, 64))
    sd2 = {"weight": other(4096).view(64, 64).to(device), "bias": other(64).to(device)}
    expected = {k: oracle_select(p, sd2[k], 0.9) for k, p in layer.named_parameters()}
    params = dict(layer.named_parameters())
    out = modkern.merge_state_dicts(params, sd2, 0.9, inplace=True, backend=backend)
    for k, p in layer.named_parameters():
        assert out[k] is p and isinstance(p, torch.nn.Parameter) and p.requires_grad, k
        assert p.grad_fn is None and p.grad is None, k
        assert_bits_equal(p, expected[k], k)
    layer(torch.ones(1, 64, device=device)).sum().backward()  # autograd still works
    assert torch.equal(layer.bias.grad, torch.ones(64, device=device))
    w = torch.nn.Parameter(base().to(device))
    assert modkern.mod_select_(w, other().to(device), 0.9, backend=backend) is w
    assert_bits_equal(w, oracle_select(base(), other(), 0.9), "mod_select_")


def test_in_place_into_inference_tensors(backend, device):
    with torch.inference_mode():
        t1, sd1 = base().to(device), {KEY: base().to(device)}
    t2 = other().to(device)
    expected = oracle_select(base(), t2, 0.9)
    assert_bits_equal(modkern.mod_select_(t1, t2, 0.9, backend=backend), expected, "_")
    modkern.merge_state_dicts(sd1, {KEY: t2}, 0.9, inplace=True, backend=backend)
    assert_bits_equal(sd1[KEY], expected, "merge inplace")
    with torch.inference_mode():
        out = torch.empty(t2.shape, device=device)
    assert_bits_equal(modkern.mod_select(base().to(device), t2, 0.9, out=out, backend=backend),
                      expected, "out=")


# ---- memory shared between the tensors --------------------------------------------------

def test_in_place_with_t2_a_view_of_t1(backend, device):
    w = base(4096).view(64, 64).to(device)
    expected = oracle_select(w, w.t(), 0.5)
    x = w.clone()
    modkern.mod_select_(x, x.t(), 0.5, backend=backend)
    assert_bits_equal(x, expected, "mod_select_(x, x.T)")
    y = w.clone()
    out = modkern.merge_state_dicts({KEY: y}, {KEY: y.t()}, 0.5, inplace=True, backend=backend)
    assert_bits_equal(out[KEY], expected, "merge inplace")
    z = w.clone()  # model 2 is model 1 itself: nothing changes
    modkern.merge_state_dicts({KEY: z}, {KEY: z}, 0.5, inplace=True, backend=backend)
    assert_bits_equal(z, w, "merged with itself")


def test_out_sharing_memory_with_t1_or_t2(backend, device):
    buf = torch.cat([base(), other()[:1]]).to(device)
    t1, t2 = base().to(device), buf[1:]
    expected = oracle_select(t1, t2.clone(), 0.5)
    got = modkern.mod_select(t1, t2, 0.5, out=buf[:-1], backend=backend)
    assert got.data_ptr() == buf.data_ptr()
    assert_bits_equal(got, expected, "out overlapping t2")
    sq, o = base(4096).view(64, 64).to(device), other(4096).view(64, 64).to(device)
    expected = oracle_select(sq, o, 0.5)
    x = sq.clone()
    got = modkern.mod_select(x, o, 0.5, out=x.t(), backend=backend)
    assert got.data_ptr() == x.data_ptr()
    assert_bits_equal(x.t(), expected, "out = t1's transpose")


def test_in_place_state_dicts_sharing_memory_across_keys(backend, device):
    mem = base(3 * 4096).view(3, 64, 64).to(device)
    sd1 = {"a": mem[0], "b": mem[1]}
    sd2 = {"a": mem[1].t(), "b": mem[0]}  # model 2 reads what model 1's merge writes
    expected = modkern.merge_state_dicts(sd1, {k: v.clone() for k, v in sd2.items()}, 0.5)
    for k in sd1:
        assert_bits_equal(expected[k], oracle_select(sd1[k], sd2[k], 0.5), k)
    modkern.merge_state_dicts(sd1, sd2, 0.5, inplace=True, backend=backend)
    for k in sd1:
        assert_bits_equal(sd1[k], expected[k], k)


# ---- other arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("out, words", [
    (torch.zeros(1).expand(4100), ("out is written", "share memory", "empty_like")),
    (torch.zeros(4100).to_sparse(), ("out must be a dense tensor", "sparse tensor")),
    ([0.0] * 4100, ("out must be a dense tensor", "got list")),
    (torch.zeros(4100, dtype=torch.float64), ("out must be", "float64")),
])
def test_bad_out(out, words):
    with pytest.raises(ModkernError) as e:
        modkern.mod_select(base(), other(), 0.5, out=out, name=KEY)
    assert isinstance(e.value, (DTypeError, ShapeMismatchError))
    assert KEY in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("sd, words", [
    ([base()], ("model 1 (base) is a list", "expected a mapping")),
    (None, ("model 1 (base) is a NoneType", "expected a mapping")),
    (torch.nn.Linear(2, 2), ("is a Linear", "model.state_dict()")),
    ({0: base()}, ("model 1 (base) has the key 0 (int)", "expected str tensor names")),
])
def test_state_dict_of_the_wrong_kind(sd, words):
    before = fingerprint(base())
    for call in (lambda: modkern.merge_state_dicts(sd, {}, 0.5, strict=False),
                 lambda: modkern.merge_state_dicts(sd, {0: other()}, 0.5, include="mlp")):
        with pytest.raises(DTypeError) as e:
            call()
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(DTypeError, match="model 2 \\(other\\)"):
        modkern.merge_state_dicts({KEY: base()}, sd, 0.5)
    assert same(fingerprint(base()), before)


def test_other_bad_arguments():
    sd = {KEY: base()}
    with pytest.raises(OptionError, match="stats must be a modkern.MergeStats"):
        modkern.merge_state_dicts(sd, {KEY: other()}, 0.5, stats={})
    with pytest.raises(OptionError, match="vocab must be one of"):
        modkern.merge_state_dicts(sd, {KEY: other()}, 0.5, vocab="bogus")
    with pytest.raises(OptionError, match="precision must be one of"):
        modkern.mod_select(base(), other(), 0.5, precision=["exact"])
    for alpha in (torch.tensor(0.5, device="meta"), torch.nested.nested_tensor([torch.ones(1)])):
        with pytest.raises(AlphaError, match="alpha must be a real number"):
            modkern.mod_select(base(), other(), alpha)
