"""`merge_state_dicts`: which tensors are merged (name filters), with which alpha (float,
pattern mapping, function), what is carried over, key checks, in-place merges (tied
weights included) and MergeStats, every merged tensor checked against the numpy oracle."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import modkern
from modkern import AlphaError, DTypeError, KeyMismatchError, MergeStats
from oracle_select import assert_bits_equal, oracle_select, take_mask

NAMES = ["model.embed_tokens.weight",
         "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.self_attn.q_proj.bias",
         "model.layers.0.mlp.up_proj.weight",
         "model.layers.0.mlp.down_proj.weight",
         "model.layers.1.mlp.up_proj.weight",
         "model.layers.1.input_layernorm.weight",
         "model.layers.10.mlp.up_proj.weight",
         "model.norm.weight"]


def make_sd(seed: int, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, name in enumerate(NAMES):
        shape = (6, 5) if name.endswith("weight") and "norm" not in name else (5,)
        d = torch.bfloat16 if "norm" in name else dtype  # mixed dtypes in one dict
        sd[name] = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.02).to(d).to(device)
    sd["model.rotary.inv_freq_steps"] = torch.arange(4, device=device)  # an integer buffer
    sd["model.attn_mask"] = torch.ones(3, dtype=torch.bool, device=device)
    return sd


def snapshot(sd):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def assert_sd_unchanged(sd, before, what):
    assert list(sd) == list(before), what
    for k in sd:
        if isinstance(sd[k], torch.Tensor) and sd[k].is_floating_point():
            assert_bits_equal(sd[k], before[k], f"{what}: {k}")
        else:
            assert torch.equal(sd[k], before[k]) if isinstance(sd[k], torch.Tensor) \
                else sd[k] == before[k]


def assert_merged(out, sd1, sd2, alphas: dict[str, float | None], precision="exact"):
    """out holds the oracle's select where alphas names a float, sd1's entry elsewhere."""
    assert list(out) == list(sd1)
    for k, t1 in sd1.items():
        assert out[k].shape == t1.shape and out[k].dtype == t1.dtype, k
        a = alphas.get(k)
        if a is None:
            assert out[k] is t1, f"{k} should be carried over"
        else:
            assert_bits_equal(out[k], oracle_select(t1, sd2[k], a, precision), k)


def test_float_alpha_merges_every_float_tensor(backend, device):
    sd1, sd2 = make_sd(1, device=device), make_sd(2, device=device)
    b1, b2 = snapshot(sd1), snapshot(sd2)
    out = modkern.merge_state_dicts(sd1, sd2, 0.7, backend=backend)
    assert out is not sd1
    assert_merged(out, sd1, sd2, {k: 0.7 for k in NAMES})
    assert_sd_unchanged(sd1, b1, "sd1")
    assert_sd_unchanged(sd2, b2, "sd2")


@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_precision_reaches_every_tensor(precision, backend):
    sd1, sd2 = make_sd(3, torch.bfloat16), make_sd(4, torch.bfloat16)
    out = modkern.merge_state_dicts(sd1, sd2, 0.9, backend=backend, precision=precision)
    assert_merged(out, sd1, sd2, {k: 0.9 for k in NAMES}, precision)


def test_result_keeps_sd1_order_shapes_dtypes():
    sd1 = make_sd(5, torch.float16)
    sd2 = OrderedDict(reversed(list(make_sd(6, torch.float32).items())))  # other order, dtype
    out = modkern.merge_state_dicts(sd1, sd2, 0.5)
    assert list(out) == list(sd1)
    for k in sd1:
        assert out[k].dtype == sd1[k].dtype and out[k].shape == sd1[k].shape
    assert_merged(out, sd1, sd2, {k: 0.5 for k in NAMES})


@pytest.mark.parametrize("include, exclude, merged", [
    ("mlp", None, [n for n in NAMES if "mlp" in n]),
    (["q_proj", "norm"], None, [n for n in NAMES if "q_proj" in n or "norm" in n]),
    (None, "*.bias", [n for n in NAMES if not n.endswith(".bias")]),
    ("model.layers.*.mlp.*", "layers.1", [NAMES[3], NAMES[4]]),  # "layers.1" hits 1 and 10
    ("model.layers.1?.*", None, [NAMES[7]]),
    ("mlp*", None, []),                      # a glob matches the whole name only
    ("*mlp*", "*down_proj*", [NAMES[3], NAMES[5], NAMES[7]]),
    ([], None, []),                          # an empty include list merges nothing
    (None, [], NAMES),
])
def test_include_exclude(include, exclude, merged):
    sd1, sd2 = make_sd(7), make_sd(8)
    stats = MergeStats()
    out = modkern.merge_state_dicts(sd1, sd2, 0.6, include=include, exclude=exclude,
                                    stats=stats)
    assert_merged(out, sd1, sd2, {k: 0.6 for k in merged})
    assert stats.tensors_merged == len(merged)
    assert stats.tensors_carried == len(sd1) - len(merged)


def test_alpha_mapping_first_match_wins():
    sd1, sd2 = make_sd(9), make_sd(10)
    rule = {"layers.0.": 0.2, "*mlp*": 0.8, "norm": 0.0, "*": 0.95}
    out = modkern.merge_state_dicts(sd1, sd2, rule)
    expect = {}
    for k in NAMES:
        expect[k] = (0.2 if "layers.0." in k else 0.8 if "mlp" in k else 0.0 if "norm" in k
                     else 0.95)
    assert expect[NAMES[3]] == 0.2 and expect[NAMES[5]] == 0.8  # the order matters here
    assert_merged(out, sd1, sd2, expect)


def test_alpha_mapping_without_a_match_raises_naming_the_key():
    sd1, sd2 = make_sd(11), make_sd(12)
    with pytest.raises(AlphaError) as e:
        modkern.merge_state_dicts(sd1, sd2, {"mlp": 0.9})
    assert NAMES[0] in str(e.value) and "mlp" in str(e.value)
    # a name kept out of the merge needs no alpha
    out = modkern.merge_state_dicts(sd1, sd2, {"mlp": 0.9}, include="mlp")
    assert_merged(out, sd1, sd2, {k: 0.9 for k in NAMES if "mlp" in k})


@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan"), True, "0.9"])
def test_alpha_mapping_bad_value_raises_naming_key_and_pattern(bad):
    sd1, sd2 = make_sd(13), make_sd(14)
    before = snapshot(sd1)
    with pytest.raises(AlphaError) as e:
        modkern.merge_state_dicts(sd1, sd2, {"up_proj": bad, "*": 0.5}, inplace=True)
    assert "up_proj" in str(e.value) and NAMES[3] in str(e.value)
    assert_sd_unchanged(sd1, before, "alpha is checked before anything is merged")


def test_alpha_callable_and_none_carries_over():
    sd1, sd2 = make_sd(15), make_sd(16)
    seen = []

    def rule(name):
        seen.append(name)
        if "norm" in name:
            return None
        return 0.3 if "layers.0." in name else 1.0

    stats = MergeStats()
    out = modkern.merge_state_dicts(sd1, sd2, rule, stats=stats)
    expect = {k: (None if "norm" in k else 0.3 if "layers.0." in k else 1.0) for k in NAMES}
    assert_merged(out, sd1, sd2, expect)
    assert set(seen) == set(NAMES)  # asked for float tensors only
    merged = [k for k in NAMES if expect[k] is not None]
    assert stats.tensors_merged == len(merged)
    assert stats.tensors_carried == len(sd1) - len(merged)
    with pytest.raises(AlphaError, match="model.norm.weight"):
        modkern.merge_state_dicts(sd1, sd2, lambda name: 2.0 if name == NAMES[-1] else 0.5)


def test_strict_key_mismatch_names_keys_and_models():
    sd1, sd2 = make_sd(17), make_sd(18)
    sd1["only.in.base"] = torch.zeros(2)
    sd2["only.in.other"] = torch.zeros(2)
    with pytest.raises(KeyMismatchError) as e:
        modkern.merge_state_dicts(sd1, sd2, 0.5)
    msg = str(e.value)
    assert "only.in.base" in msg and "only.in.other" in msg
    assert "model 1" in msg and "model 2" in msg and "strict=False" in msg
    del sd1["only.in.base"]
    with pytest.raises(KeyMismatchError, match="only.in.other"):
        modkern.merge_state_dicts(sd1, sd2, 0.5)


def test_strict_key_mismatch_many_keys_is_short():
    sd1, sd2 = make_sd(19), {}
    with pytest.raises(KeyMismatchError) as e:
        modkern.merge_state_dicts(sd1, sd2, 0.5)
    assert len(str(e.value)) < 600 and "..." in str(e.value)


def test_non_strict_carries_base_extras_and_ignores_other_extras():
    sd1, sd2 = make_sd(20), make_sd(21)
    sd1["extra.base"] = torch.ones(3)
    sd2["extra.other"] = torch.ones(3)
    del sd2[NAMES[1]]
    stats = MergeStats()
    out = modkern.merge_state_dicts(sd1, sd2, 0.5, strict=False, stats=stats)
    assert "extra.other" not in out
    assert_merged(out, sd1, sd2, {k: 0.5 for k in NAMES if k != NAMES[1]})
    assert out["extra.base"] is sd1["extra.base"] and out[NAMES[1]] is sd1[NAMES[1]]
    assert stats.tensors_merged == len(NAMES) - 1


def test_non_float_entries_carried_over():
    sd1, sd2 = make_sd(22), make_sd(23)
    sd1["meta.step"], sd2["meta.step"] = 7, 8  # not a tensor at all
    sd1["ids"], sd2["ids"] = torch.arange(3), torch.arange(3) + 5
    out = modkern.merge_state_dicts(sd1, sd2, 0.0)  # alpha 0 would take all of t2
    for k in ("meta.step", "ids", "model.rotary.inv_freq_steps", "model.attn_mask"):
        assert out[k] is sd1[k]


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_float_against_non_float_is_a_dtype_error(which):
    sd1, sd2 = make_sd(24), make_sd(25)
    target = sd1 if which == "sd1" else sd2
    target[NAMES[2]] = torch.arange(5)
    with pytest.raises(DTypeError) as e:
        modkern.merge_state_dicts(sd1, sd2, 0.5)
    assert NAMES[2] in str(e.value) and ("model 1" if which == "sd1" else "model 2") in str(e.value)


def test_shape_mismatch_fails_before_any_work():
    sd1, sd2 = make_sd(26), make_sd(27)
    sd2[NAMES[-1]] = torch.zeros(7, dtype=torch.bfloat16)
    before = snapshot(sd1)
    with pytest.raises(modkern.ShapeMismatchError, match=NAMES[-1]):
        modkern.merge_state_dicts(sd1, sd2, 0.5, inplace=True)
    assert_sd_unchanged(sd1, before, "validated before the first tensor is merged")


def test_inplace_overwrites_sd1_only(backend, device):
    sd1, sd2 = make_sd(28, device=device), make_sd(29, device=device)
    expected = modkern.merge_state_dicts(snapshot(sd1), sd2, 0.4, backend=backend)
    objects = dict(sd1)
    ptrs = {k: v.data_ptr() for k, v in sd1.items()}
    b2 = snapshot(sd2)
    out = modkern.merge_state_dicts(sd1, sd2, 0.4, inplace=True, backend=backend)
    assert out is sd1
    for k in sd1:
        assert sd1[k] is objects[k] and sd1[k].data_ptr() == ptrs[k]
        if sd1[k].is_floating_point():
            assert_bits_equal(sd1[k], expected[k], k)
    assert_sd_unchanged(sd2, b2, "sd2")


def test_inplace_non_contiguous_tensor():
    base1 = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    sd1 = {"w": base1.t(), "s": base1[:, ::2]}
    sd2 = {"w": torch.randn(6, 8), "s": torch.randn(8, 3)}
    before = {k: v.clone() for k, v in sd1.items()}
    modkern.merge_state_dicts(sd1, sd2, 0.5, inplace=True, include="w")
    assert_bits_equal(sd1["w"], oracle_select(before["w"], sd2["w"], 0.5), "w")


@pytest.mark.parametrize("tie", ["same object", "same storage"])
def test_inplace_tied_weights_match_out_of_place(tie, backend):
    g = torch.Generator().manual_seed(30)
    w1, w2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)

    def tied(w):
        return {"embed.weight": w, "mid": torch.randn(3, generator=g),
                "lm_head.weight": w if tie == "same object" else w[:]}

    sd1, sd2 = tied(w1), tied(w2)
    expected = modkern.merge_state_dicts(sd1, sd2, 0.6, backend=backend)
    assert_bits_equal(expected["lm_head.weight"], oracle_select(w1, w2, 0.6), "oracle")
    stats = MergeStats()
    out = modkern.merge_state_dicts(sd1, sd2, 0.6, inplace=True, backend=backend, stats=stats)
    for k in out:
        assert_bits_equal(out[k], expected[k], k)
    assert out["embed.weight"].data_ptr() == out["lm_head.weight"].data_ptr()
    assert stats.tensors_merged + stats.tensors_carried == 3


def test_merge_stats_counts(backend):
    sd1, sd2 = make_sd(31), make_sd(32)
    stats = MergeStats()
    modkern.merge_state_dicts(sd1, sd2, 0.8, include="layers", backend=backend, stats=stats)
    merged = [k for k in NAMES if "layers" in k]
    assert stats.tensors_merged == len(merged)
    assert stats.tensors_carried == len(sd1) - len(merged)
    assert stats.elements_merged == sum(sd1[k].numel() for k in merged)
    taken = {k: int(take_mask(sd1[k], 0.8).sum()) for k in merged}
    assert stats.taken_by_key == taken
    assert stats.elements_taken == sum(taken.values()) > 0


def test_empty_state_dicts():
    assert modkern.merge_state_dicts({}, {}, 0.5) == {}


def test_inplace_tied_in_sd1_with_equal_untied_sd2_values():
    g = torch.Generator().manual_seed(33)
    w1, w2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    sd1 = {"embed": w1, "head": w1}
    sd2 = {"embed": w2, "head": w2.clone()}  # untied, but equal: one merge fits both
    expected = modkern.merge_state_dicts(sd1, sd2, 0.6)
    out = modkern.merge_state_dicts(sd1, sd2, 0.6, inplace=True)
    for k in out:
        assert_bits_equal(out[k], expected[k], k)


@pytest.mark.parametrize("case", ["sd2 differs", "alpha differs", "reshaped view",
                                  "overlapping slices"])
def test_inplace_refuses_shared_memory_it_cannot_merge_once(case):
    # out of place these merge fine; in place, the second key would be merged from values
    # already merged (or could not hold its own result): a clear error, sd1 untouched
    g = torch.Generator().manual_seed(34)
    w1, w2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    sd1 = {"embed": w1, "head": w1}
    sd2 = {"embed": w2, "head": w2}
    alpha = 0.6
    if case == "sd2 differs":
        sd2["head"] = torch.randn(10, 4, generator=g)
    elif case == "alpha differs":
        alpha = {"embed": 0.6, "head": 0.7}
    elif case == "reshaped view":
        sd1["head"], sd2["head"] = w1.view(-1), w2.view(-1)
    else:
        sd1 = {"embed": w1[:6], "head": w1[4:]}
        sd2 = {"embed": w2[:6], "head": w2[4:]}
    expected = modkern.merge_state_dicts(sd1, sd2, alpha)
    for k in sd1:
        assert_bits_equal(expected[k], oracle_select(sd1[k], sd2[k],
                                                     alpha if isinstance(alpha, float)
                                                     else alpha[k]), k)
    before = w1.clone()
    with pytest.raises(modkern.ModkernError) as e:
        modkern.merge_state_dicts(sd1, sd2, alpha, inplace=True)
    assert "'embed'" in str(e.value) and "'head'" in str(e.value)
    assert "inplace=False" in str(e.value)
    assert_bits_equal(w1, before, "sd1 untouched")


def test_inplace_disjoint_views_of_one_storage():
    g = torch.Generator().manual_seed(35)
    w1, w2 = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    sd1 = {"a": w1[:5], "b": w1[5:]}  # e.g. a fused weight split into two keys
    sd2 = {"a": w2[:5], "b": w2[5:]}
    expected = modkern.merge_state_dicts(sd1, sd2, 0.5)
    out = modkern.merge_state_dicts(sd1, sd2, 0.5, inplace=True)
    for k in sd1:
        assert_bits_equal(out[k], expected[k], k)


def test_every_alpha_of_a_mapping_is_checked_before_any_work():
    sd1 = {"a.w": torch.tensor([0.0, 1.0])}
    sd2 = {"a.w": torch.tensor([5.0, 6.0])}
    with pytest.raises(modkern.AlphaError, match="pattern 'never'"):
        modkern.merge_state_dicts(sd1, sd2, {"a.": 0.5, "never": 1.5})


def test_float8_is_refused_with_a_clear_error():
    t = torch.zeros(4).to(torch.float8_e4m3fn)
    with pytest.raises(modkern.DTypeError, match="float8 is not supported"):
        modkern.merge_state_dicts({"w": t}, {"w": t}, 0.5)
