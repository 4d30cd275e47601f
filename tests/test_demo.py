"""`modkern demo`: the reduced (--quick) run end to end, and its table's sanity."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")

from modkern.cli import build_parser, main  # noqa: E402
from modkern.demo.tasks import TASK_A, TASK_B, Task, copying, held_out, train  # noqa: E402
from modkern.demo.toy import char_tokenizer, tiny_causal_lm  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--quick", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text())


def test_quick_demo_runs_and_writes_its_outputs(quick_run, capsys):
    code, out, results = quick_run
    assert code == 0
    for folder in ("base", "specialist-addition", "specialist-reversal", "mod-0.5",
                   "linear-0.5", "distilled"):
        assert (out / folder / "model.safetensors").is_file()
        assert (out / folder / "config.json").is_file()
    assert (out / "table.txt").read_text().startswith("model")
    try:
        import matplotlib  # noqa: F401
        assert (out / "accuracy.png").stat().st_size > 0
    except ImportError:
        pass
    methods = [r["method"] for r in results["rows"]]
    assert methods.count("linear") == 3 and methods.count("distill") == 1
    assert methods.count("mod") in (3, 4) and methods.count("mixture") in (3, 4)


def test_quick_demo_picks_alpha_by_the_sweep_on_validation(quick_run):
    _, out, results = quick_run
    chosen = results["sweep"]["chosen"]
    for method in ("mod", "mixture"):
        rows = results["sweep"][method]
        best = max(rows, key=lambda r: r["scores"]["mean"])
        assert chosen[method] == best["alpha"] and len(rows) == 19
        # the chosen alpha is merged (or decoded) and scored on the test split
        assert any(r["method"] == method and r["alpha"] == chosen[method]
                   for r in results["rows"])
    text = (out / "sweep.txt").read_text()
    assert text.startswith("MoD merge: log-likelihood by alpha") and "mixture:" in text


def test_quick_demo_table_is_sane(quick_run):
    _, _, results = quick_run
    rows = {r["model"]: r for r in results["rows"]}
    for r in rows.values():
        assert set(r["accuracy"]) == {TASK_A.name, TASK_B.name}
        assert all(0.0 <= acc <= 1.0 for acc in r["accuracy"].values())
    base = rows["base"]["accuracy"]
    for task in (TASK_A.name, TASK_B.name):
        # each specialist learned its own task beyond the base
        assert rows[f"specialist-{task}"]["accuracy"][task] > base[task]
    mods = sorted((r for r in rows.values() if r["method"] == "mod"), key=lambda r: r["alpha"])
    for r in mods:
        assert 0 <= r["elements_taken"] <= r["elements_merged"]
        assert 0 < r["bytes_read_b"] and 0 < r["bytes_read_a"]
    # a higher alpha keeps more of model 1 (the addition specialist)
    taken = [r["elements_taken"] for r in mods]
    assert taken == sorted(taken, reverse=True)


def test_training_is_reproducible():
    tok = char_tokenizer("0123456789+=abcdefgh")

    def trained():
        model = tiny_causal_lm(len(tok), hidden=32, layers=1, seed=5)
        train(model, tok, Task("copying", copying), steps=3, batch=8, lr=1e-3, seed=6)
        return model.state_dict()

    first, second = trained(), trained()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_held_out_prompts_are_distinct_and_correct():
    for task, check in ((TASK_A, lambda p, a: eval(p[:-1]) == int(a)),
                        (TASK_B, lambda p, a: p[:-1][::-1] == a)):
        exs = held_out(task, 50, seed=1)
        assert len({p for p, _ in exs}) == 50
        assert all(check(p, a) for p, a in exs)


def test_demo_refuses_a_foreign_out_folder(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_help_documents_every_option(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[command]._actions:
        assert action.help, f"option {action.option_strings} has no help text"


def test_validation_split_shares_no_prompt_with_the_test_split():
    from modkern.demo.sweep_step import validation_split

    tests = {p for i, t in enumerate((TASK_A, TASK_B))
             for p, _ in held_out(t, 200, seed=10_000 + i)}
    validation = validation_split((TASK_A, TASK_B), 100, tests)
    prompts = [e.prompt for e in validation]
    assert len(prompts) == 200 and len(set(prompts)) == 200
    assert not set(prompts) & tests
    # without the exclusion these seeds do draw test prompts: the check has teeth
    assert set(e.prompt for e in validation_split((TASK_A, TASK_B), 100, set())) & tests
