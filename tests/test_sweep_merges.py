"""`sweep_merges`: every step equals `merge_state_dicts` at that step's alpha (rule) bit for
bit, in any order of alphas, for every dtype, both precisions, name filters, per-name rules,
non-strict dicts, tied, empty and constant tensors; sd1 and sd2 are never modified; errors
come at the step where merge_state_dicts raises them."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, strategies as st

import modkern
from modkern import AlphaError, KeyMismatchError, NonFiniteError
from modkern.ops import select_buckets
from oracle_select import assert_bits_equal
from test_merge_state_dicts import NAMES, assert_sd_unchanged, make_sd, snapshot

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
BIG = "model.layers.2.mlp.gate_proj.weight"  # above DIRECT_MAX: the merge's threshold path


def sweep_dicts(seed: int, dtype=torch.float32) -> tuple[dict, dict]:
    """make_sd's dicts plus a large tensor with zeros of both signs and an empty and a
    constant one."""
    sd1, sd2 = make_sd(seed, dtype), make_sd(seed + 1, dtype)
    g = torch.Generator().manual_seed(seed)
    for sd in (sd1, sd2):
        sd[BIG] = (torch.randn(130, 257, generator=g, dtype=torch.float64) * 0.02).to(dtype)
        sd["model.empty"] = torch.empty(0, 4, dtype=dtype)
        sd["model.constant"] = torch.full((40,), 0.5, dtype=dtype)
    sd1[BIG][::3, ::5] = 0.0
    sd1[BIG][1::3, ::7] = -0.0
    sd2["model.constant"] += 0.25
    return sd1, sd2


def check_sweep(sd1, sd2, alphas, **options):
    """Run the sweep and compare every step with merge_state_dicts (carried entries must be
    sd1's own tensors, merged ones equal bit for bit); sd1 and sd2 unchanged after."""
    before1, before2 = snapshot(sd1), snapshot(sd2)
    steps = 0
    working = None
    for alpha, merged in modkern.sweep_merges(sd1, sd2, alphas, **options):
        assert alpha is alphas[steps]
        working = merged if working is None else working
        assert merged is working  # one dict, updated in place
        expect = modkern.merge_state_dicts(sd1, sd2, alpha, **options)
        assert list(merged) == list(expect)
        for k, t in expect.items():
            if t is sd1[k]:
                assert merged[k] is sd1[k], f"step {steps} {alpha}: {k} should be carried"
            else:
                assert_bits_equal(merged[k], t, f"step {steps} alpha {alpha}: {k}")
        steps += 1
    assert steps == len(alphas)
    assert_sd_unchanged(sd1, before1, "sd1")
    assert_sd_unchanged(sd2, before2, "sd2")


ORDERS = {
    "descending": [0.95, 0.9, 0.8, 0.7, 0.6, 0.5],
    "ascending": [0.0, 0.3, 0.5, 0.9, 1.0],
    "repeated": [0.5, 0.5, 0.9, 0.9, 0.5, 0.0, 0.0, 1.0, 1.0],
    "edges": [1.0, 0.0, 1.0, 0.0],
    "random": random.Random(0).sample([i / 20 for i in range(21)], 21),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", list(ORDERS))
def test_every_step_equals_merge_state_dicts(dtype, order):
    sd1, sd2 = sweep_dicts(1, dtype)
    check_sweep(sd1, sd2, ORDERS[order])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_reference_precision(dtype):
    sd1, sd2 = sweep_dicts(3, dtype)
    check_sweep(sd1, sd2, [0.9, 0.2, 0.55, 0.9, 1.0, 0.0], precision="reference")


@pytest.mark.parametrize("include, exclude", [("mlp", None), (None, "*.bias"),
                                              (["q_proj", "norm"], "layers.1"), ([], None)])
def test_include_exclude(include, exclude):
    sd1, sd2 = sweep_dicts(5, torch.bfloat16)
    check_sweep(sd1, sd2, [0.9, 0.4, 0.7], include=include, exclude=exclude)


def test_alpha_rules_mappings_and_functions():
    sd1, sd2 = sweep_dicts(7, torch.bfloat16)
    rules = [
        {"layers.0.": 0.2, "*mlp*": 0.8, "*": 0.95},
        0.6,
        lambda name: None if "norm" in name else (0.3 if "layers.0." in name else 0.9),
        {"layers.0.": 0.9, "*": 0.2},
        lambda name: 0.0 if name == BIG else None,
        {"*": 1.0},
        {"layers.0.": 0.2, "*mlp*": 0.8, "*": 0.95},
    ]
    check_sweep(sd1, sd2, rules)


def test_non_strict():
    sd1, sd2 = sweep_dicts(9)
    sd1["extra.base"] = torch.ones(3)
    sd2["extra.other"] = torch.ones(3)
    del sd2[NAMES[1]]
    check_sweep(sd1, sd2, [0.8, 0.1, 0.5], strict=False)
    with pytest.raises(KeyMismatchError, match="extra.base"):
        next(modkern.sweep_merges(sd1, sd2, [0.5]))


def test_tied_and_strided_tensors():
    sd1, sd2 = sweep_dicts(11)
    sd1["lm_head.weight"] = sd1[NAMES[0]]                # tied in model 1
    sd2["lm_head.weight"] = sd2[NAMES[0]] * 2            # not in model 2
    sd1["transposed"] = sd1[BIG].t()                     # a strided view of another tensor
    sd2["transposed"] = sd2[BIG].t().contiguous()
    check_sweep(sd1, sd2, [0.9, 0.3, 0.6, 0.0])


def test_mixed_dtypes_of_model_2():
    sd1, sd2 = sweep_dicts(13, torch.bfloat16)
    sd2 = {k: v.double() if v.is_floating_point() else v for k, v in sd2.items()}
    check_sweep(sd1, sd2, [0.95, 0.5, 0.7])


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_many_chunks_and_both_array_paths(arrays, monkeypatch):
    """Tensors of many chunks (grouped in parallel), and the torch ops path that runs on
    GPUs, exercised on the CPU."""
    monkeypatch.setattr(select_buckets, "CHUNK", 1000)
    if arrays == "torch":
        monkeypatch.setattr(select_buckets.ArrayOps, "for_tensor",
                            staticmethod(lambda t: select_buckets.ArrayOps(t.device, False)))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sd1, sd2 = sweep_dicts(15, torch.bfloat16)
        check_sweep(sd1, sd2, [0.9, 0.5, 0.0, 0.7, 1.0])
    finally:
        torch.set_num_threads(threads)


def test_triton_backend_bounds():
    pytest.importorskip("triton")
    sd1, sd2 = make_sd(17, torch.bfloat16), make_sd(18, torch.bfloat16)
    check_sweep(sd1, sd2, [0.9, 0.3, 0.6], backend="triton")


@given(st.lists(st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.51, 0.9, 0.97, 1.0]), min_size=1,
                max_size=8),
       st.sampled_from(DTYPES), st.integers(0, 3))
def test_any_sequence_of_alphas(alphas, dtype, seed):
    sd1, sd2 = sweep_dicts(20 + seed, dtype)
    check_sweep(sd1, sd2, alphas)


def test_alpha_not_among_the_steps_regroups():
    """MergeSweep.apply at an alpha the sweep was not set up for still equals the merge."""
    from modkern.merging.sweep import MergeSweep, SweepInputs
    sd1, sd2 = sweep_dicts(30, torch.bfloat16)
    sweep = MergeSweep(SweepInputs(sd1, sd2), [0.9, 0.5])
    sweep.step(1)
    for alpha in (0.73, 0.5, 0.21, 0.9):
        merged = sweep.apply(alpha)
        for k, t in modkern.merge_state_dicts(sd1, sd2, alpha).items():
            assert_bits_equal(merged[k], t, f"{alpha} {k}") if t.is_floating_point() else None


def test_stats_count_each_step():
    from modkern.merging.sweep import MergeSweep, SweepInputs
    sd1, sd2 = sweep_dicts(31, torch.bfloat16)
    sweep = MergeSweep(SweepInputs(sd1, sd2), [0.9, 0.2], include="mlp")
    for k, alpha in enumerate([0.9, 0.2]):
        sweep.step(k)
        expect = modkern.MergeStats()
        modkern.merge_state_dicts(sd1, sd2, alpha, include="mlp", stats=expect)
        assert sweep.stats == expect


# --- errors at the step where merge_state_dicts raises them --------------------------------

def test_bad_rule_raises_at_its_step_only():
    sd1, sd2 = sweep_dicts(40)
    steps = modkern.sweep_merges(sd1, sd2, [0.9, {"mlp": 0.5}, 0.2])
    assert next(steps)[0] == 0.9
    with pytest.raises(AlphaError, match=NAMES[0]):
        next(steps)
    steps = modkern.sweep_merges(sd1, sd2, [0.9, 1.5])
    next(steps)
    with pytest.raises(AlphaError, match="1.5"):
        next(steps)


def test_non_finite_other_raises_at_the_first_step_that_takes_it():
    sd1, sd2 = sweep_dicts(41, torch.float32)
    t1 = sd1[BIG].view(-1)
    low = int(torch.argsort(t1)[t1.numel() // 4])   # taken only at low alphas
    sd2[BIG].view(-1)[low] = float("nan")
    alphas = [0.95, 0.9, 0.1, 0.9]
    steps = modkern.sweep_merges(sd1, sd2, alphas)
    for alpha in alphas[:2]:
        expect = modkern.merge_state_dicts(sd1, sd2, alpha)
        assert_bits_equal(next(steps)[1][BIG], expect[BIG], str(alpha))
    with pytest.raises(NonFiniteError) as got:
        next(steps)
    with pytest.raises(NonFiniteError) as want:
        modkern.merge_state_dicts(sd1, sd2, 0.1)
    assert str(got.value) == str(want.value) and f"flat index {low}" in str(got.value)


def test_non_finite_base_raises_at_a_step_that_merges_it():
    sd1, sd2 = sweep_dicts(42, torch.float32)
    sd1[NAMES[3]][0, 0] = float("inf")
    rules = [lambda n: None if n == NAMES[3] else 0.5, 0.5]
    steps = modkern.sweep_merges(sd1, sd2, rules)
    next(steps)
    with pytest.raises(NonFiniteError) as got:
        next(steps)
    with pytest.raises(NonFiniteError) as want:
        modkern.merge_state_dicts(sd1, sd2, 0.5)
    assert str(got.value) == str(want.value)


def test_the_first_error_in_merge_order_wins():
    """Two bad tensors at one step: the message is the one merge_state_dicts gives."""
    sd1, sd2 = sweep_dicts(43, torch.float32)
    sd2[NAMES[1]].view(-1)[int(sd1[NAMES[1]].argmax())] = float("nan")
    sd1[BIG][0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as got:
        next(modkern.sweep_merges(sd1, sd2, [0.5]))
    with pytest.raises(NonFiniteError) as want:
        modkern.merge_state_dicts(sd1, sd2, 0.5)
    assert str(got.value) == str(want.value)


def test_nothing_runs_before_the_first_step():
    read = []

    def alphas():
        read.append(True)
        yield 0.5

    steps = modkern.sweep_merges({}, {"only.in.other": torch.ones(1)}, alphas())
    assert read == []  # a generator: nothing is read or checked before the first step
    with pytest.raises(KeyMismatchError):
        next(steps)


# --- a step that raises can be passed over; inputs checked as merge_state_dicts checks them -

def outcomes(steps, n: int) -> list:
    """n calls of next(steps): each step's (alpha, copy of merged) or its error."""
    got = []
    for _ in range(n):
        try:
            alpha, merged = next(steps)
            got.append((alpha, {k: v.clone() for k, v in merged.items()}))
        except modkern.ModkernError as err:
            got.append(err)
    return got


def assert_like_merges(got: list, sd1, sd2, alphas, **options) -> None:
    """Each outcome is what merge_state_dicts gives at that alpha: the same merge bit for
    bit, or an error of the same type and message."""
    assert len(got) == len(alphas)
    for k, (outcome, alpha) in enumerate(zip(got, alphas)):
        try:
            expect = modkern.merge_state_dicts(sd1, sd2, alpha, **options)
        except modkern.ModkernError as err:
            assert type(outcome) is type(err) and str(outcome) == str(err), f"step {k}"
            continue
        assert not isinstance(outcome, Exception), f"step {k} {alpha}: {outcome}"
        assert outcome[0] is alpha and list(outcome[1]) == list(expect)
        for name, t in expect.items():
            if t.is_floating_point():
                assert_bits_equal(outcome[1][name], t, f"step {k} alpha {alpha}: {name}")
            else:
                assert torch.equal(outcome[1][name], t), f"step {k}: {name}"


def nan_only_low_alphas_take(seed: int) -> tuple[dict, dict]:
    """sweep_dicts with a NaN of model 2 where t1 is smallest (taken only at low alphas)."""
    sd1, sd2 = sweep_dicts(seed, torch.float32)
    sd2[BIG].view(-1)[int(sd1[BIG].argmin())] = float("nan")
    return sd1, sd2


@pytest.mark.parametrize("alphas", [[1.0, 0.0, 1.0], [0.0, 1.0, 0.95], [0.9, 1.0, 0.0],
                                    [1.0, 0.0, 0.0, 0.97, 0.0, 1.0]])
def test_a_step_that_raises_is_passed_over(alphas):
    sd1, sd2 = nan_only_low_alphas_take(44)
    steps = modkern.sweep_merges(sd1, sd2, alphas)
    got = outcomes(steps, len(alphas))
    assert any(isinstance(g, NonFiniteError) for g in got)
    assert_like_merges(got, sd1, sd2, alphas)
    with pytest.raises(StopIteration):
        next(steps)


def test_a_bad_rule_is_passed_over_and_a_for_loop_continues():
    sd1, sd2 = sweep_dicts(45, torch.bfloat16)
    alphas = [0.9, {"mlp": 0.5}, 1.5, lambda n: 0.2, 0.0]
    assert_like_merges(outcomes(modkern.sweep_merges(sd1, sd2, alphas), 5), sd1, sd2, alphas)
    steps, seen = modkern.sweep_merges(sd1, sd2, alphas), []
    while True:
        try:
            seen.append(next(steps)[0])
        except AlphaError:
            continue
        except StopIteration:
            break
    assert seen == [alphas[0], alphas[3], alphas[4]]


def test_an_error_of_the_state_dicts_is_raised_by_every_step():
    sd1, sd2 = sweep_dicts(46)
    sd1["extra.base"] = torch.ones(3)
    alphas = [0.9, 0.1]
    got = outcomes(modkern.sweep_merges(sd1, sd2, alphas), 2)
    assert all(isinstance(g, KeyMismatchError) for g in got)
    assert_like_merges(got, sd1, sd2, alphas)


@pytest.mark.parametrize("which", [1, 2, 12])
def test_parameters_give_tensors_without_autograd_history(which):
    """sd1 (or sd2, or both) from named_parameters(): the merged tensors are plain, as
    merge_state_dicts returns them, and autograd stays on between steps."""
    torch.manual_seed(which)
    models = [torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.LayerNorm(7),
                                  torch.nn.Linear(7, 3)) for _ in range(2)]
    sds = [dict(m.named_parameters()) if str(i + 1) in str(which)
           else {k: v.detach() for k, v in m.named_parameters()} for i, m in enumerate(models)]
    alphas = [0.9, 1.0, 0.3, 0.0]
    check_sweep(*sds, alphas)
    for alpha, merged in modkern.sweep_merges(*sds, alphas):
        assert torch.is_grad_enabled()
        expect = modkern.merge_state_dicts(*sds, alpha)
        for k, t in merged.items():
            assert (t.requires_grad, t.grad_fn) == (expect[k].requires_grad, None), k


@pytest.mark.parametrize("alphas", [0.5, 1, torch.tensor(0.5), {"*": 0.5}, lambda n: 0.5,
                                    "0.5"])
def test_a_single_alpha_is_refused_saying_to_give_a_list(alphas):
    sd1, sd2 = sweep_dicts(47)
    with pytest.raises(AlphaError, match=r"list of alphas.*give \["):
        modkern.sweep_merges(sd1, sd2, alphas)
    check_sweep(sd1, sd2, [0.5])  # the list form works
    check_sweep(sd1, sd2, torch.tensor([0.5, 0.25]).tolist())


@pytest.mark.parametrize("which", [0, 1])
def test_modules_instead_of_state_dicts_are_a_dtype_error(which):
    models = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    sds = [m.state_dict() for m in models]
    sds[which] = models[which]
    with pytest.raises(modkern.DTypeError, match=rf"model {which + 1}.*Linear.*state_dict"):
        next(modkern.sweep_merges(*sds, [0.5]))
    with pytest.raises(modkern.DTypeError) as want:
        modkern.merge_state_dicts(*sds, 0.5)
    with pytest.raises(modkern.DTypeError) as got:
        next(modkern.sweep_merges(*sds, [0.5]))
    assert str(got.value) == str(want.value)


def test_many_names_and_per_name_rules_set_up_in_one_pass():
    """Many tensors (and tied ones, and rules giving each name its own alphas in different
    orders): every step still equals merge_state_dicts."""
    g = torch.Generator().manual_seed(48)
    names = [f"model.layers.{i}.w" for i in range(300)]
    sd1 = {n: torch.randn(5, generator=g) for n in names}
    sd2 = {n: torch.randn(5, generator=g) for n in names}
    sd1["tied"] = sd1[names[7]]
    sd2["tied"] = torch.randn(5, generator=g)
    rules = [lambda n: (hash(n) % 7) / 7, 0.5, lambda n: None if n.endswith("9.w") else 0.1,
             {"*.1*": 0.9, "*": 0.3}, 0.5]
    check_sweep(sd1, sd2, rules)
