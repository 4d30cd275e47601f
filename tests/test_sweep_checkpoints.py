"""The sweep on checkpoint folders: every step of the working model (BASE, patched in
place) equals the merge of the two folders bit for bit; OTHER is read exactly at the pages
holding the elements the lowest alpha selects (byte counters), BASE only where a step
gives elements back; and `modkern sweep` end to end (its --out bit-identical to
`modkern merge`, bad input: one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _checkpoints import ckpts, load_folder, run_cli  # noqa: F401  (session fixture)

import modkern
from modkern.checkpoint.folder import Checkpoint
from modkern.checkpoint.safetensors_io import PAGE
from modkern.checkpoint.sweep import open_checkpoint_sweep
from modkern.cli import main
from oracle_select import assert_bits_equal, take_mask

pytest.importorskip("transformers")


def reference(ckpts, a: str, b: str, alpha, **options):
    return modkern.merge_state_dicts(load_folder(ckpts[a]), load_folder(ckpts[b]), alpha,
                                     **options)


@pytest.mark.parametrize("pair, options", [
    (("qwen_a", "qwen_b"), {}),                                    # tied, OTHER sharded
    (("llama_a", "llama_b"), {"include": "mlp", "precision": "reference"}),
])
def test_every_step_equals_the_merge(ckpts, pair, options):
    rules = [0.9, 0.4, 0.7, 0.0, 1.0, {"layers.0.": 0.3, "*": 0.6}, 0.4]
    with open_checkpoint_sweep(ckpts[pair[0]], ckpts[pair[1]], rules, **options) as opened:
        state = opened.model.state_dict()
        for k, rule in enumerate(rules):
            opened.swept.step(k)
            for name, t in reference(ckpts, *pair, rule, **options).items():
                assert_bits_equal(state[name], t, f"step {k} {rule}: {name}")


def expected_other_bytes(ckpts, base: str, other: str, alpha: float) -> int:
    """Headers of OTHER's files, plus for every merged tensor the bytes of its pages that
    hold an element the select at `alpha` takes (clamped to the tensor, as read)."""
    sd1 = load_folder(ckpts[base])
    total = 0
    with Checkpoint(ckpts[other], "OTHER") as ck:
        for reader in ck.readers:
            total += 8 + len(reader.header_bytes)
        for name, t1 in sd1.items():
            if not t1.is_floating_point():
                continue
            info = ck.info(name)
            idx = np.flatnonzero(take_mask(t1, alpha, "exact"))
            first = info.offset + idx * info.itemsize
            pages = np.unique(np.concatenate([first // PAGE,
                                              (first + info.itemsize - 1) // PAGE]))
            lo = np.maximum(pages * PAGE, info.offset)
            hi = np.minimum((pages + 1) * PAGE, info.offset + info.nbytes)
            total += int((hi - lo).sum())
    return total


@pytest.mark.parametrize("alphas", [[0.95, 0.9, 0.8], [0.8, 0.95, 0.85, 0.8]])
def test_other_is_read_only_at_the_lowest_selection(ckpts, tmp_path, alphas):
    with open_checkpoint_sweep(ckpts["llama_a"], ckpts["llama_b"], alphas) as opened:
        for k in range(len(alphas)):
            opened.swept.step(k)
        other_read = opened.ck2.bytes_read
        base_read = opened.ck1.bytes_read
        base_headers = sum(8 + len(r.header_bytes) for r in opened.ck1.readers)
        size = opened.ck2.weight_bytes
    assert other_read == expected_other_bytes(ckpts, "llama_a", "llama_b", min(alphas))
    assert other_read < size  # (tiny tensors: a few pages each, most of them touched)
    report = modkern.merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "m",
                                       min(alphas), progress=False)
    assert other_read == report.bytes_read_other  # what one merge at the lowest alpha reads
    if alphas == sorted(alphas, reverse=True):
        assert base_read == base_headers  # descending: nothing is given back to BASE
    else:
        assert base_read > base_headers   # BASE's file is read where elements go back


# --- the command -------------------------------------------------------------------------

def data_file(tmp_path, tasks: bool = True):
    """Prompt/answer lines in the words of the test checkpoints' tokenizer (llama_a's: the
    qwen folders' config makes AutoTokenizer pick Qwen2's class, which splits words apart)."""
    path = tmp_path / "eval.jsonl"
    rows = [("w1 w2 w3", "w4 w5", "a"), ("w7 w8", "w9", "b"), ("w10 w11 w12", "w13", "a"),
            ("w20", "w21 w22 w23", "b")]
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, **({"task": t} if tasks
                                                                      else {})}) + "\n"
                            for p, a, t in rows))
    return path


def weights(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_sweep_command_writes_the_best_merge(ckpts, tmp_path):
    best, png = tmp_path / "best", tmp_path / "sweep.png"
    r = run_cli("sweep", ckpts["llama_a"], ckpts["llama_b"], "--alpha", "0.5:0.9:0.2",
                "--eval", data_file(tmp_path), "--out", best, "--plot", png, "--include",
                "mlp", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    table = r.stdout.splitlines()
    assert table[0].startswith("MoD merge: log-likelihood by alpha")
    rows = [line for line in table if line[:2] in ("  ", "* ") and line[2:5] in ("0.5", "0.7",
                                                                               "0.9")]
    assert len(rows) == 3 and sum(line.startswith("*") for line in rows) == 1
    recipe = (best / "modkern_recipe.yaml").read_text()
    best_alpha = json.loads(json.dumps(__import__("yaml").safe_load(recipe)))["alpha"]
    ref = tmp_path / "ref"
    r2 = run_cli("merge", ckpts["llama_a"], ckpts["llama_b"], ref, "--alpha", str(best_alpha),
                 "--include", "mlp", "-q")
    assert r2.returncode == 0, r2.stderr
    assert weights(best) == weights(ref)  # bit-identical to `modkern merge --alpha <best>`
    assert "sweep" in recipe and "rows" in recipe
    # the plot (matplotlib is a test dependency), complete, with no temporary file beside it
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in png.parent.iterdir() if p.name.startswith(".")) == []


def test_per_layer_exact_metric_in_process(ckpts, tmp_path, capsys):
    best = tmp_path / "best"
    code = main(["sweep", str(ckpts["llama_a"]), str(ckpts["llama_b"]), "--alpha",
                 "0.3,0.6,0.9", "--eval", str(data_file(tmp_path, tasks=False)), "--metric",
                 "exact", "--per-layer", "--out", str(best), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    assert "MoD merge: exact match by alpha" in out and "per-layer:" in out and "gain" in out
    import yaml
    rule = yaml.safe_load((best / "modkern_recipe.yaml").read_text())["alpha"]
    expected = reference(ckpts, "llama_a", "llama_b", rule)
    got = load_folder(best)
    for name, t in expected.items():
        assert_bits_equal(got[name], t, name)


def test_mixture_command(ckpts, tmp_path, capsys):
    code = main(["sweep", str(ckpts["llama_a"]), str(ckpts["llama_b"]), "--alpha", "0:1:0.5",
                 "--eval", str(data_file(tmp_path)), "--mixture", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("mixture: log-likelihood by alpha")
    assert "one forward of each model per batch" in out


@pytest.mark.parametrize("args, message", [
    (["--alpha", "0.9:0.1:0.1"], "--alpha '0.9:0.1:0.1': expected START:STOP:STEP"),
    (["--alpha", "0.5,1.5"], "--alpha value 1.5 must lie in [0, 1]"),
    (["--alpha", "0.5", "--mixture"], "--out does not apply to --mixture"),
    (["--alpha", "0.5", "--plot", "/no/such/folder/s.png"], "--plot /no/such/folder/s.png"),
    (["--alpha", "0.5", "--plot", "sweep.txt"], "--plot sweep.txt: expected a file name ending"),
    (["--alpha", "0:inf:0.1"], "expected START:STOP:STEP, finite"),
    (["--alpha=-inf:1:0.1"], "expected START:STOP:STEP, finite"),
    (["--alpha", "0:1e308:1e-308"], "expected START:STOP:STEP, finite"),
    (["--alpha", "0:nan:0.1"], "expected START:STOP:STEP, finite"),
    (["--alpha", "0:1:0.1:5"], "expected START:STOP:STEP, finite"),
    (["--alpha", "0:1:1e-9"], "1000000000 alphas; expected at most 1001"),
    (["--alpha", ",".join(["0.5"] * 1002)], "1002 alphas; expected at most 1001"),
    (["--alpha", "0.5", "--batch-size", "0"], "argument --batch-size: expected a whole number"),
    (["--alpha", "0.5", "--batch-size", "-3"], "argument --batch-size: expected a whole number"),
    (["--alpha", "0.5", "--batch-size", "2.5"], "argument --batch-size: expected a whole number"),
])
def test_bad_options_one_line_exit_2(ckpts, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        code = main(["sweep", str(ckpts["qwen_a"]), str(ckpts["qwen_b"]), "--eval",
                     str(data_file(tmp_path)), "--out", str(out), *args])
    except SystemExit as exit_info:  # argparse refuses a bad value itself
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("modkern sweep: error: ")
    assert message in err and not out.exists()


def test_bad_data_names_file_line_and_field(ckpts, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "w1", "answer": "w2"}\n{"prompt": "w1"}\n')
    code = main(["sweep", str(ckpts["qwen_a"]), str(ckpts["qwen_b"]), "--alpha", "0.5",
                 "--eval", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2: field \"answer\" (or \"response\") is missing" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_bad_checkpoints_one_line_exit_2(ckpts, tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    cases = [
        ([str(ckpts["qwen_a"]), str(tmp_path / "missing")], [], "no such folder"),
        ([str(ckpts["qwen_a"]), str(ckpts["qwen_untied"])], [], "only in model 2"),
        ([str(ckpts["qwen_a"]), str(ckpts["qwen_b"])], ["--out", str(existing)],
         "already exists"),
    ]
    for paths, extra, message in cases:
        code = main(["sweep", *paths, "--alpha", "0.5", "--eval", str(data_file(tmp_path)),
                     "--plot", str(tmp_path / "p.png"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "p.png").exists()
    assert list(existing.iterdir()) == []
