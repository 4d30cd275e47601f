"""Vocab-parallel mix_logits (group=): 2 and 4 gloo ranks on the CPU, each holding an odd-
width slice of the vocabulary, against the single-process result on the whole vocabulary
and the float64 reference: outputs, gradients to the logits slices and to the weights
(complete and identical on every rank), both backends (Triton interpreted on the CPU).
Tolerances are written down and justified in mix_cases.py; a distributed result and the
single-process one may each be off the reference by the tolerance, hence twice it between
them. Inputs: tests/mix_parallel_cases.py."""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.distributed as dist
from mix_cases import ATOL_OUT, assert_close_grad, assert_close_out, logits
from mix_parallel_cases import CASES, call, make_case, spawn, weight_tensor

from modkern import OptionError, ShapeMismatchError, mix_logits
from modkern.ops.mix_reference import mix_logits_many_reference

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

BACKENDS = ("torch", "triton") if importlib.util.find_spec("triton") else ("torch",)
WORLDS = (2, 4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case and backend, run once per world size (the ranks' start-up dominates)."""
    dirs = {}
    for world in WORLDS:
        tmp = tmp_path_factory.mktemp(f"ranks{world}")
        spawn(world, tmp, CASES, BACKENDS)
        dirs[world] = tmp
    return dirs


def _gathered(tmp, name, backend, world):
    parts = [torch.load(tmp / f"{name}-{backend}-{r}.pt") for r in range(world)]
    return parts, torch.cat([p["out"] for p in parts], -1)


def _single(case, backend):
    """The single-process result on the whole vocabulary, with its gradients."""
    ls = [l.clone().requires_grad_() for l in case["logits"]]
    w = weight_tensor(case)
    out = call(ls, case["weights"] if w is None else w, case, backend)
    if case["g"] is None:
        return out.detach(), None, None
    (out.where(torch.isfinite(out), 0.0) * case["g"][..., :out.shape[-1]]).sum().backward()
    return out.detach(), [l.grad for l in ls], None if w is None else w.grad


def _reference(case):
    """float64 reference over the valid columns, and its gradients to the logits."""
    V = min(l.shape[-1] for l in case["logits"])
    nv = case["kwargs"].get("n_valid", V)
    ls = [l[..., :nv].double().requires_grad_() for l in case["logits"]]
    w = case["weights"]
    if isinstance(w, torch.Tensor) and len(ls) > 2:
        ws = list(w.double().unbind(-1))
    else:
        a = w.double() if isinstance(w, torch.Tensor) else w
        ws = [a, 1 - a]
    out = mix_logits_many_reference(ls, ws)
    grads = None
    if case["g"] is not None:
        g = case["g"][..., :nv].double()
        (out.where(torch.isfinite(out), 0.0) * g).sum().backward()
        grads = [l.grad for l in ls]
    return out.detach(), nv, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("world", WORLDS)
def test_slices_match_single_process(runs, world, name, backend):
    case = make_case(name, world)
    parts, out = _gathered(runs[world], name, backend, world)
    want, want_grads, want_wgrad = _single(case, backend)
    assert out.dtype == want.dtype and out.shape == want.shape
    if name == "nan_row":  # +inf: the whole row NaN, as log_softmax of a row with +inf
        assert torch.isnan(out[2]).all() and torch.isnan(out[3]).all()
    assert_close_out(out, want, atol=2 * ATOL_OUT)
    if name != "nan_row":
        ref, nv, ref_grads = _reference(case)
        assert_close_out(out[..., :nv], ref)
        assert (out[..., nv:] == float("-inf")).all()
    if case["g"] is None:
        return
    for k, l in enumerate(case["logits"]):
        if want_grads[k] is None:  # a model of weight 0 is not in the graph at all
            assert all(p["grads"][k] is None for p in parts)
            continue
        got = torch.cat([p["grads"][k] for p in parts], -1)
        assert got.dtype == l.dtype and got.shape == l.shape
        V = want.shape[-1]
        assert (got[..., V:] == 0).all()  # columns beyond the common vocabulary
        assert_close_grad(got[..., :V], want_grads[k][..., :V], l.dtype)
        assert_close_grad(got[..., :nv], ref_grads[k], l.dtype)
        assert (got[..., nv:V] == 0).all()
    if want_wgrad is not None:
        # complete on every rank, not a partial sum: the same tensor everywhere
        for p in parts[1:]:
            assert torch.equal(p["weight_grad"], parts[0]["weight_grad"])
        assert_close_grad(parts[0]["weight_grad"], want_wgrad, torch.float32)


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo group in this process, torn down afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_of_one_is_the_single_process_result(world_of_one, backend):
    case = make_case("hard_fp32", 1)
    l1, l2 = case["logits"]
    got = mix_logits(l1, l2, case["weights"], backend=backend, group=world_of_one,
                     n_valid=100, vocab_start=0)
    want = mix_logits(l1, l2, case["weights"], backend=backend, n_valid=100)
    assert_close_out(got, want, atol=2 * ATOL_OUT)


def test_argument_errors(world_of_one):
    l1, l2 = torch.randn(2, 7), torch.randn(2, 7)
    with pytest.raises(ShapeMismatchError, match="vocab_start"):
        mix_logits(l1, l2, 0.5, group=world_of_one, n_valid=5)
    with pytest.raises(ShapeMismatchError, match="vocab_start must be an int"):
        mix_logits(l1, l2, 0.5, group=world_of_one, n_valid=5, vocab_start=-1)
    with pytest.raises(ShapeMismatchError, match="n_valid must be an int >= 1"):
        mix_logits(l1, l2, 0.5, group=world_of_one, n_valid=0, vocab_start=0)
    with pytest.raises(ShapeMismatchError, match="vocabulary widths differ"):
        mix_logits(l1, l2[:, :5], 0.5, group=world_of_one)
    with pytest.raises(OptionError, match="ProcessGroup"):
        mix_logits(l1, l2, 0.5, group="world")
    with pytest.raises(OptionError, match="only meaningful with group"):
        mix_logits(l1, l2, 0.5, vocab_start=3)


def test_group_without_init_process_group():
    if dist.is_initialized():
        pytest.skip("another test left a process group initialised in this process")
    with pytest.raises(OptionError, match="init_process_group"):
        mix_logits(torch.randn(2, 7), torch.randn(2, 7), 0.5, group=object())


def _engines():
    from modkern.ops import mix_torch
    yield "torch", mix_torch
    if "triton" in BACKENDS:
        from modkern.kernels import mix_logits as km
        yield "triton", km


@pytest.mark.parametrize("engine", [e for _, e in _engines()], ids=[n for n, _ in _engines()])
@settings(max_examples=12)
@given(data=st.data())
def test_engine_pieces_compose_over_any_cut(engine, data):
    """The seams the ranks use, without processes: cut the vocabulary anywhere (empty slices
    included), combine the slices' partial stats as the all_gather does, sum the backward
    sums as the all_reduce does: the slices put together are the float64 reference."""
    from modkern.ops.mix_parallel import merge_stats
    V = data.draw(st.integers(1, 200), label="V")
    cuts = sorted(data.draw(st.lists(st.integers(0, V), max_size=3), label="cuts"))
    bounds = list(zip([0, *cuts], [*cuts, V]))
    nv = data.draw(st.integers(1, V), label="n_valid")
    offset = data.draw(st.sampled_from([0.0, 1e4, -1e4]), label="offset")  # 1e4: exactness
    l1, l2 = (logits((3, V), torch.float64, seed=s) for s in (1, 2))
    l1[0] += offset
    l2[1, : V // 2] -= 200.0
    l1, l2 = l1.float(), l2.to(torch.bfloat16)
    W = torch.tensor([[0.25, 0.75], [0.6, 0.4], [1.0, 0.0]])
    g = logits((3, V), seed=3)

    def nv_of(a, b):
        here = min(max(nv - a, 0), b - a)
        return None if here == b - a else here

    parts = [([l1[:, a:b].contiguous(), l2[:, a:b].contiguous()], nv_of(a, b))
             for a, b in bounds if b > a]
    partial = [merge_stats(*engine.local_stats(ls, n), dim=1) for ls, n in parts]
    M, S = merge_stats(torch.stack([m for m, _ in partial]), torch.stack([s for _, s in partial]),
                       0)
    stats = torch.stack([M, torch.log(S)], -1)
    out = torch.cat([engine.forward(ls, W, n, stats=stats)[0] for ls, n in parts], -1)
    ref_in = [l1[:, :nv].double().requires_grad_(), l2[:, :nv].double().requires_grad_()]
    ref = mix_logits_many_reference(ref_in, [W[:, 0].double(), W[:, 1].double()])
    assert_close_out(out[:, :nv], ref)
    assert (out[:, nv:] == float("-inf")).all()

    gg = g.where(torch.isfinite(out), 0.0)
    c = sum(engine.backward_sums(ls, W, stats, gg[:, a:b].contiguous(), n)[0]
            for (ls, n), (a, b) in zip(parts, [x for x in bounds if x[1] > x[0]]))
    grads = [engine.backward_grads(ls, W, stats, gg[:, a:b].contiguous(), c, n)
             for (ls, n), (a, b) in zip(parts, [x for x in bounds if x[1] > x[0]])]
    (ref * gg[:, :nv].double()).where(torch.isfinite(ref), 0.0).sum().backward()
    for k in range(2):
        got = torch.cat([gr[k] for gr in grads], -1)
        assert_close_grad(got[:, :nv], ref_in[k].grad, (l1.dtype, l2.dtype)[k])
        assert (got[:, nv:] == 0).all()
