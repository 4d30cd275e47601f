"""`modkern.sweep` on plain torch modules (no transformers needed): every step's working
model equals model 1 with merge_state_dicts' result loaded, bit for bit, also with
non-contiguous parameters and buffers; bad arguments raise one ModkernError; the scoring
totals and the result's table and plot on edge cases."""

from __future__ import annotations

import math

import pytest
import torch

import modkern
from modkern import AlphaError, DTypeError, ModkernError, OptionError
from modkern.evaluation.result import SweepResult, SweepRow
from modkern.evaluation.scoring import EvalSet, TaskTotals
from oracle_select import assert_bits_equal


class Strided(torch.nn.Module):
    """A linear layer, a non-contiguous parameter and buffers: non-contiguous, contiguous,
    integer, not persistent (left out of the state dict)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(6, 8)
        self.p = torch.nn.Parameter(torch.randn(5, 7, generator=g).t())
        self.register_buffer("buf", torch.randn(8, 6, generator=g).t())
        self.register_buffer("plain", torch.randn(9, generator=g))
        self.register_buffer("steps", torch.arange(12).reshape(3, 4).t())
        self.register_buffer("scratch", torch.randn(4, 3, generator=g).t(), persistent=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(8, 6, generator=g))


def recorder(seen: list):
    """A score function that keeps a copy of the model's state dict at each step."""
    def score(model: torch.nn.Module) -> float:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return float(len(seen))
    return score


@pytest.mark.parametrize("options", [{}, {"include": "buf"}, {"exclude": "lin.*"}])
def test_non_contiguous_parameters_and_buffers_equal_merge_state_dicts(options):
    model1, model2 = Strided(0), Strided(1)
    before = {k: v.clone() for k, v in model1.state_dict().items()}
    alphas, seen = [0.9, 0.0, 1.0, 0.4], []
    result = modkern.sweep(model1, model2, alphas, recorder(seen), **options)
    assert [r.alpha for r in result.rows] == alphas and len(seen) == len(alphas)
    for alpha, got in zip(alphas, seen):
        expect = modkern.merge_state_dicts(model1.state_dict(), model2.state_dict(), alpha,
                                           **options)
        assert list(got) == list(expect)
        for k, t in expect.items():
            if t.is_floating_point():
                assert_bits_equal(got[k], t, f"alpha {alpha}: {k}")
            else:
                assert torch.equal(got[k], t), k
    for k, v in model1.state_dict().items():  # model 1 untouched, its strides too
        assert torch.equal(v, before[k]) and v.stride() == before[k].stride(), k


def test_bare_alpha_is_refused_saying_to_give_a_list():
    model1, model2 = Strided(0), Strided(1)
    for alphas in (0.5, 1, {"*": 0.5}):
        with pytest.raises(AlphaError, match=r"sweep: alphas must be a list.*give \["):
            modkern.sweep(model1, model2, alphas, lambda m: 0.0)
        with pytest.raises(AlphaError, match=r"sweep_mixture: alphas must be a list"):
            modkern.sweep_mixture(model1, model2, alphas, None)
    assert len(modkern.sweep(model1, model2, (0.5,), lambda m: 0.0).rows) == 1


@pytest.mark.parametrize("which", [0, 1])
def test_state_dicts_instead_of_models_are_a_dtype_error(which):
    models = [Strided(0), Strided(1)]
    models[which] = models[which].state_dict()
    expect = rf"model {which + 1}.*OrderedDict.*nn.Module.*sweep_merges"
    with pytest.raises(DTypeError, match=expect):
        modkern.sweep(*models, [0.5], lambda m: 0.0)
    with pytest.raises(DTypeError, match=rf"model {which + 1}"):
        modkern.sweep_mixture(*models, [0.5], None)


# --- scoring -----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2", None])
def test_eval_set_refuses_a_bad_batch_size(size):
    with pytest.raises(OptionError, match=rf"batch_size must be .* got {size!r}"):
        modkern.EvalSet([], None, batch_size=size)


def test_eval_set_takes_a_batch_size_of_one():
    assert EvalSet([], None, batch_size=1).batch_size == 1


def test_task_totals_count_past_float32s_integers():
    """2**24 + 1 tokens: float32 counts stop at 2**24 (16.7M); the mean stays exact."""
    totals = TaskTotals(["a", "b"])
    totals.counts[0], totals.sums[0] = 2.0 ** 24, -(2.0 ** 24)
    totals.add(torch.tensor([-1.0, -3.0]), torch.tensor([0, 1]))
    assert totals.counts.tolist() == [2 ** 24 + 1, 1]
    assert totals.scores() == {"a": -1.0, "b": -3.0, "mean": -2.0}


# --- the result's table and plot ------------------------------------------------------------

def rows(*scores: dict) -> list[SweepRow]:
    return [SweepRow(0.1 * (i + 1), dict(s)) for i, s in enumerate(scores)]


def test_an_empty_result_has_a_table_but_no_plot_or_best(tmp_path):
    result = SweepResult([])
    assert result.records() == [] and "alpha" in result.table()
    with pytest.raises(ModkernError, match="no rows"):
        result.best_alpha
    with pytest.raises(ModkernError, match="no rows"):
        result.plot(tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


@pytest.mark.parametrize("later, missing", [({"a": 1.0}, "mean"), ({"mean": 1.0}, "a"),
                                            ({}, "a")])
def test_a_row_without_a_score_of_the_first_is_one_clear_error(tmp_path, later, missing):
    result = SweepResult(rows({"a": 0.5, "mean": 0.5}, later))
    assert "nan" in result.table()
    with pytest.raises(ModkernError, match=rf"alpha 0.2 has no score '{missing}'"):
        result.plot(tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_rows_with_more_scores_than_the_first_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = SweepResult(rows({"mean": 0.5}, {"mean": 0.7, "extra": 0.1}, {"mean": math.nan}))
    assert result.best_alpha == pytest.approx(0.2)
    assert result.plot(tmp_path / "ok.png").stat().st_size > 0
