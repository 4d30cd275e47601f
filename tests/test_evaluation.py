"""Prompt/answer data, the built-in scorers (against log-likelihoods computed by hand, one
example at a time, in float64) and `modkern.sweep` / `sweep_mixture` on tiny models
(every row equals scoring the merge made by merge_state_dicts)."""

from __future__ import annotations

import math

import pytest
import torch

import modkern
from modkern import OptionError
from modkern.evaluation.data import Example

pytest.importorskip("transformers")

from modkern.demo.toy import char_tokenizer, tiny_causal_lm  # noqa: E402

ALPHABET = "0123456789+=abcdefgh"
EXAMPLES = [Example("12+3=", "15", "add"), Example("ab=", "ba", "rev"),
            Example("7+1=", "8", "add"), Example("abcd=", "dcba", "rev"),
            Example("5=", "55", "add")]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def models(tok):
    return (tiny_causal_lm(len(tok), hidden=32, layers=2, seed=0),
            tiny_causal_lm(len(tok), hidden=32, layers=2, seed=1))


# --- scorers -----------------------------------------------------------------------------

def hand_loglik(model, tok, examples, add_eos=False) -> dict[str, float]:
    """Per task, the mean over answer tokens of log p, one unpadded example at a time."""
    per_task: dict[str, list[float]] = {}
    for e in examples:
        p = tok(e.prompt)["input_ids"]
        a = tok(e.answer, add_special_tokens=False)["input_ids"] + ([1] if add_eos else [])
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        per_task.setdefault(e.task, []).extend(
            logp[len(p) + i - 1, t].item() for i, t in enumerate(a))
    return {k: sum(v) / len(v) for k, v in per_task.items()}


@pytest.mark.parametrize("batch_size", [1, 2, 64])
@pytest.mark.parametrize("add_eos", [False, True])
def test_loglik_equals_hand_computed(models, tok, batch_size, add_eos):
    model = models[0]
    data = modkern.EvalSet(EXAMPLES, tok, batch_size=batch_size, add_eos=add_eos)
    got = modkern.loglik_scorer(data)(model)
    want = hand_loglik(model, tok, EXAMPLES, add_eos)
    assert set(got) == {"add", "rev", "mean"}
    for task in ("add", "rev"):
        assert got[task] == pytest.approx(want[task], abs=1e-5)
    assert got["mean"] == pytest.approx((want["add"] + want["rev"]) / 2, abs=1e-5)


def test_loglik_without_tasks_gives_the_mean_only(models, tok):
    plain = [Example(e.prompt, e.answer) for e in EXAMPLES]
    got = modkern.loglik_scorer(modkern.EvalSet(plain, tok, batch_size=3))(models[1])
    want = hand_loglik(models[1], tok, [Example(e.prompt, e.answer, "x") for e in plain])
    assert list(got) == ["mean"] and got["mean"] == pytest.approx(want["x"], abs=1e-5)


def greedy_answer(model, tok, prompt: str, n: int) -> str:
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_exact_match(models, tok):
    model = models[0]
    own = [Example(e.prompt, greedy_answer(model, tok, e.prompt, len(e.answer)) or "x",
                   e.task) for e in EXAMPLES]
    hits = [greedy_answer(model, tok, e.prompt, len(e.answer)) == e.answer for e in own]
    got = modkern.exact_match_scorer(modkern.EvalSet(own, tok, batch_size=2))(model)
    per_task = {t: [h for h, e in zip(hits, own) if e.task == t] for t in ("add", "rev")}
    for t, hs in per_task.items():
        assert got[t] == pytest.approx(sum(hs) / len(hs))
    assert any(hits)
    wrong = [Example(e.prompt, "hhhh", e.task) for e in EXAMPLES]
    assert modkern.exact_match_scorer(modkern.EvalSet(wrong, tok))(model)["mean"] == 0.0


# --- sweeps ------------------------------------------------------------------------------

def merged_copy(model1, model2, alpha, **options):
    """Model 1 with merge_state_dicts' result loaded: what every sweep step must equal."""
    import copy
    out = copy.deepcopy(model1)
    out.load_state_dict(modkern.merge_state_dicts(model1.state_dict(), model2.state_dict(),
                                                  alpha, **options))
    return out


def test_sweep_rows_equal_scoring_each_merge(models, tok, tmp_path):
    model1, model2 = models
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    data = modkern.EvalSet(EXAMPLES, tok, batch_size=2)
    score = modkern.loglik_scorer(data)
    alphas = [0.9, 0.6, 0.3, 0.0, 0.6, {"layers.0.": 0.2, "*": 0.8}]
    seen = []
    result = modkern.sweep(model1, model2, alphas, score, include="mlp", on_row=seen.append)
    assert [r.alpha for r in result.rows] == alphas and seen == result.rows
    for row in result.rows:
        stats = modkern.MergeStats()
        modkern.merge_state_dicts(model1.state_dict(), model2.state_dict(), row.alpha,
                                  include="mlp", stats=stats)
        assert row.scores == score(merged_copy(model1, model2, row.alpha, include="mlp"))
        assert (row.taken, row.merged) == (stats.elements_taken, stats.elements_merged)
    best = max(result.rows, key=lambda r: r.scores["mean"])
    assert result.best is best and result.best_alpha is best.alpha
    assert result.metric == "log-likelihood"
    table = result.table()
    assert table.count("\n") == len(alphas) + 2 and "* " in table
    for m, b in zip(models, before):  # the user's models are untouched
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())
    pytest.importorskip("matplotlib")
    assert result.plot(tmp_path / "s.png").stat().st_size > 0


def test_sweep_tied_embeddings_and_float_scores(tok):
    model1 = tiny_causal_lm(len(tok), hidden=32, layers=1, seed=3)
    model1.config.tie_word_embeddings = True
    model1.tie_weights()
    model2 = tiny_causal_lm(len(tok), hidden=32, layers=1, seed=4)
    model2.config.tie_word_embeddings = True
    model2.tie_weights()
    score = modkern.loglik_scorer(modkern.EvalSet(EXAMPLES, tok))
    result = modkern.sweep(model1, model2, [0.8, 0.2],
                           lambda m: score(m)["mean"])
    for row in result.rows:
        assert row.scores == {"score": score(merged_copy(model1, model2, row.alpha))["mean"]}
    with pytest.raises(OptionError, match="inplace"):
        modkern.sweep(model1, model2, [0.5], score, inplace=True)


def test_sweep_mixture_equals_the_mixture_by_hand(models, tok):
    model1, model2 = models
    alphas = [0.0, 0.25, 1.0]
    result = modkern.sweep_mixture(model1, model2, alphas, modkern.EvalSet(EXAMPLES, tok, 2))
    assert result.method == "mixture" and [r.alpha for r in result.rows] == alphas
    for row in result.rows:
        per_task: dict[str, list[float]] = {}
        for e in EXAMPLES:
            p = tok(e.prompt)["input_ids"]
            a = tok(e.answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + a])
            with torch.no_grad():
                p1 = torch.softmax(model1(ids).logits[0].double(), -1)
                p2 = torch.softmax(model2(ids).logits[0].double(), -1)
            mix = torch.log(row.alpha * p1 + (1 - row.alpha) * p2)
            per_task.setdefault(e.task, []).extend(
                mix[len(p) + i - 1, t].item() for i, t in enumerate(a))
        for task, values in per_task.items():
            assert row.scores[task] == pytest.approx(sum(values) / len(values), abs=1e-4)
    ends = hand_loglik(model1, tok, EXAMPLES), hand_loglik(model2, tok, EXAMPLES)
    assert result.rows[2].scores["add"] == pytest.approx(ends[0]["add"], abs=1e-5)
    assert result.rows[0].scores["add"] == pytest.approx(ends[1]["add"], abs=1e-5)
    assert not math.isnan(result.value(result.best))


def test_sweep_refuses_a_state_dict_of_copies():
    class Copying(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3))

        def state_dict(self, *args, **kwargs):
            return {"w": self.w.detach().clone()}

    with pytest.raises(OptionError, match="'w' is a copy"):
        modkern.sweep(Copying(), Copying(), [0.5], lambda m: 0.0)
