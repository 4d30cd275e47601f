"""`modkern distill` and modkern.distill: tiny local models of two architectures (Qwen2
student and teacher, a Llama teacher with a wider, padded head) sharing one character
tokenizer. The loss of a training step equals the reference on the models' full logits;
a run lowers the loss and publishes a checkpoint transformers loads; bad input gives one
line, exit code 2 and no OUT."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from modkern.cli import build_parser, main  # noqa: E402
from modkern.demo.toy import char_tokenizer, tiny_causal_lm  # noqa: E402
from modkern.distill.data import IGNORE, Example, collate, read_prompt_answers  # noqa: E402
from modkern.distill.models import check_head  # noqa: E402
from modkern.distill.train import DistillConfig, distill_loss  # noqa: E402
from modkern.ops.kd_reference import mixture_kd_reference  # noqa: E402

ALPHABET = "0123456789+=abcdefgh"


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok = char_tokenizer(ALPHABET)
    small = dict(hidden=32, layers=1, heads=2, kv_heads=1)
    dirs = {"student": _save(tiny_causal_lm(len(tok), seed=0, **small), tok, root / "S"),
            "qwen": _save(tiny_causal_lm(len(tok), seed=1, **small), tok, root / "A"),
            "llama": _save(tiny_causal_lm(len(tok) + 5, arch="llama", seed=2, **small), tok,
                           root / "B")}
    rng = random.Random(0)
    lines = []
    for i in range(48):
        a, b = rng.randrange(100), rng.randrange(10)
        field = "answer" if i % 2 else "response"
        lines.append(json.dumps({"prompt": f"{a}+{b}=", field: str(a + b)}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    return root, tok, dirs


def _args(root, dirs, out, *extra):
    return ["distill", "--student", str(dirs["student"]), "--teacher", str(dirs["qwen"]),
            "--teacher", str(dirs["llama"]), "--data", str(root / "train.jsonl"), "--out",
            str(out), "--steps", "12", "--lr", "3e-3", "--batch", "8", "--quiet", *extra]


def test_step_loss_equals_reference_on_full_logits(models):
    """The fused loss on hidden states and heads equals the reference on the models'
    logits, shifted by one, response positions only (the Llama head is 5 wider)."""
    from transformers import AutoModelForCausalLM

    root, tok, dirs = models
    heads = [check_head(n, AutoModelForCausalLM.from_pretrained(dirs[n]))
             for n in ("student", "qwen", "llama")]
    examples = [Example("12+3=", "15"), Example("7+9=", "16"), Example("99+1=", "100")]
    batch = collate(tok, examples, 64)
    config = DistillConfig(temperature=1.5, kind="jsd")
    got = distill_loss(heads[0], heads[1:], [0.25, 0.75], batch, config)
    logits = [h.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
              .logits[:, :-1].double() for h in heads]
    want = mixture_kd_reference(logits[0], logits[1:], [0.25, 0.75], temperature=1.5,
                                kind="jsd", mask=batch.labels[:, 1:] != IGNORE)
    assert logits[2].shape[-1] == logits[0].shape[-1] + 5
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_distill_trains_and_publishes_a_loadable_checkpoint(models, tmp_path):
    from transformers import AutoModelForCausalLM

    root, tok, dirs = models
    out = tmp_path / "out"
    assert main(_args(root, dirs, out, "--weights", "0.4,0.6", "--kind", "reverse_kl",
                      "--temperature", "2")) == 0
    assert {"config.json", "model.safetensors", "modkern_recipe.yaml",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    import yaml
    recipe = yaml.safe_load((out / "modkern_recipe.yaml").read_text())
    losses = recipe["result"]["losses_every_step"]
    assert len(losses) == 12 and recipe["options"]["kind"] == "reverse_kl"
    assert [t["weight"] for t in recipe["teachers"]] == [0.4, 0.6]
    assert sum(losses[-3:]) < sum(losses[:3])  # the loss fell
    trained = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    before = AutoModelForCausalLM.from_pretrained(dirs["student"], local_files_only=True)
    assert type(trained).__name__ == "Qwen2ForCausalLM"
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                      before.state_dict().values())]
    assert all(changed)
    # --force replaces it; without, OUT is refused and kept
    assert main(_args(root, dirs, out)) == 2
    assert main(_args(root, dirs, out, "--force", "--steps", "1")) == 0
    recipe = (out / "modkern_recipe.yaml").read_text()
    assert recipe.startswith("# modkern distill recipe:")
    assert yaml.safe_load(recipe)["options"]["steps"] == 1


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2="', "train.jsonl:2: not JSON"),
    ('{"prompt": "1+1="}', 'train.jsonl:1: field "answer" (or "response") is missing'),
    ('{"prompt": 5, "response": "2"}', 'train.jsonl:1: field "prompt" is a int'),
    ('["1+1=", "2"]', "train.jsonl:1: a JSON list, expected an object"),
    ('{"prompt": "a", "response": "b", "answer": "c"}', 'both "answer" and "response"'),
    ("\n\n", "no examples"),
])
def test_bad_data_is_one_line_and_exit_2(models, tmp_path, capsys, line, message):
    root, tok, dirs = models
    data = tmp_path / "train.jsonl"
    data.write_text(line)
    args = _args(root, dirs, tmp_path / "out")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modkern distill: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_models_and_weights_are_refused(models, tmp_path, capsys):
    root, tok, dirs = models
    other = char_tokenizer("0123456789+=xyz")
    odd = _save(tiny_causal_lm(len(other), hidden=16, layers=1, heads=2, kv_heads=1), other,
                tmp_path / "odd")
    capsys.readouterr()  # the save's own progress bars
    cases = [
        (["--weights", "0.5,0.6"], "sum to 1"),
        (["--weights", "1.0"], "2 teachers but 1 weights"),
        (["--teacher", str(odd)], "tokenizer differs"),
        (["--teacher", str(tmp_path / "missing")], "no config.json"),
    ]
    for extra, message in cases:
        assert main(_args(root, dirs, tmp_path / "out", *extra)) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    args = _args(root, dirs, dirs["qwen"] / "inside")
    assert main(args) == 2 and "is inside teacher 1 folder" in capsys.readouterr().err
    for out, message in ((tmp_path / "file" / "out", "is a file; expected a folder"),
                         (dirs["llama"], "is the teacher 2 folder"),
                         (root, "contains student folder")):
        (tmp_path / "file").write_text("x")
        assert main(_args(root, dirs, out)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_reader_and_batches(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ab=", "answer": "ba", "task": "rev"}\n\n'
                    '{"prompt": "1+2=", "response": "3"}\n')
    exs = read_prompt_answers(data)
    assert exs == [Example("ab=", "ba", "rev", f"{data}:1"), Example("1+2=", "3", None,
                                                                       f"{data}:3")]
    tok = char_tokenizer(ALPHABET)
    batch = collate(tok, exs, 64)
    vocab = tok.get_vocab()
    assert batch.input_ids[0].tolist() == [vocab[c] for c in "ab=ba"] + [tok.eos_token_id]
    assert batch.labels[0].tolist() == [IGNORE] * 3 + [vocab["b"], vocab["a"],
                                                       tok.eos_token_id]
    assert batch.labels[1].tolist() == [IGNORE] * 4 + [vocab["3"], tok.eos_token_id]
    assert batch.attention_mask[1].tolist() == [1] * 6
    cut = collate(tok, exs[:1], 4)  # max_length cuts the response
    assert cut.labels[0].tolist() == [IGNORE] * 3 + [vocab["b"]]


def test_help_documents_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["distill"]._actions:
        assert action.help, f"option {action.option_strings} has no help text"


def test_a_failing_disk_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    root, tok, dirs = models

    def full(self, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    assert main(_args(root, dirs, tmp_path / "out", "--steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write the checkpoint: No space left on device" in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
