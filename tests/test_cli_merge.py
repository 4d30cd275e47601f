"""`modkern merge` run as a user runs it: a subprocess, its exit code, its one-line output,
and what is (never half-) left on disk, including when the process is killed mid-merge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _checkpoints import ROOT, ckpts, load_folder, run_cli  # noqa: F401  (session fixture)

from modkern.checkpoint.merge import merge_checkpoints
from modkern.merging.state_dict import merge_state_dicts


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_merge_command(ckpts, tmp_path):
    out = tmp_path / "out"
    r = run_cli("merge", ckpts["qwen_a"], ckpts["qwen_b"], out, "--alpha", "0.9")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modkern merge: merged 26 tensors")
    assert "OTHER" in lines[0] and str(out) in lines[0]
    assert "tensors" not in r.stderr  # no progress bar when stderr is not a terminal
    expected = merge_state_dicts(load_folder(ckpts["qwen_a"]), load_folder(ckpts["qwen_b"]), 0.9)
    got = load_folder(out)
    assert all(torch.equal(got[k], t) for k, t in expected.items())


def test_per_layer_alpha_options_and_recipe_rerun(ckpts, tmp_path):
    out = tmp_path / "out"
    r = run_cli("merge", ckpts["llama_a"], ckpts["llama_b"], out, "--alpha", "layers.0.*=0.6",
                "--alpha", "0.85", "--include", "mlp", "--include", "self_attn",
                "--exclude", "k_proj", "--precision", "reference", "--dtype", "float32",
                "--max-shard-size", "50KB", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    expected = merge_state_dicts(load_folder(ckpts["llama_a"]), load_folder(ckpts["llama_b"]),
                                 {"layers.0.*": 0.6, "*": 0.85}, include=["mlp", "self_attn"],
                                 exclude=["k_proj"], precision="reference")
    got = load_folder(out)
    assert all(torch.equal(got[k], t.float()) for k, t in expected.items())
    again = tmp_path / "again"
    r = run_cli("merge", ckpts["llama_a"], ckpts["llama_b"], again, "--max-shard-size", "50KB",
                "--recipe", out / "modkern_recipe.yaml", "-q")
    assert r.returncode == 0, r.stderr
    a, b = _files(out), _files(again)
    assert {k: v for k, v in a.items() if k.endswith("safetensors")} == \
        {k: v for k, v in b.items() if k.endswith("safetensors")}


def test_recipe_of_an_alpha_function_reruns(ckpts, tmp_path):
    """A function alpha is recorded as exact-name patterns (and what it left unmerged as
    excluded): `--recipe` rebuilds the same weights."""
    out = tmp_path / "out"

    def alpha(name):
        return None if "norm" in name else (0.6 if "layers.0." in name else 0.9)

    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], out, alpha, progress=False)
    again = tmp_path / "again"
    r = run_cli("merge", ckpts["llama_a"], ckpts["llama_b"], again,
                "--recipe", out / "modkern_recipe.yaml", "-q")
    assert r.returncode == 0, r.stderr
    expected = merge_state_dicts(load_folder(ckpts["llama_a"]), load_folder(ckpts["llama_b"]),
                                 alpha)
    for folder in (out, again):
        got = load_folder(folder)
        assert all(torch.equal(got[k], t) for k, t in expected.items()), folder


def test_paper_config_command(ckpts, tmp_path):
    cfg = tmp_path / "mod_config.yml"
    cfg.write_text(f"base_model: {ckpts['qwen_a']}\nexperts:\n"
                   f"  - source_model: {ckpts['qwen_a']}\n  - source_model: {ckpts['qwen_b']}\n"
                   "weights: [0.9, 0.1]\nmodel_kwargs: {torch_dtype: bfloat16}\n")
    r = run_cli("merge", "--config", cfg, tmp_path / "out", "--precision", "reference",
                "--include", "mlp")
    assert r.returncode == 0, r.stderr
    expected = merge_state_dicts(load_folder(ckpts["qwen_a"]), load_folder(ckpts["qwen_b"]), 0.9,
                                 include="mlp", precision="reference")
    got = load_folder(tmp_path / "out")
    assert all(torch.equal(got[k], t) for k, t in expected.items())
    assert "paper_config" in (tmp_path / "out" / "modkern_recipe.yaml").read_text()


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["no such folder"]),
    ("bin", ["pickled", "save_pretrained"]),
    ("keys", ["lm_head.weight", "--no-strict"]),
    ("alpha-text", ["PATTERN=NUMBER"]),
    ("no-alpha", ["no alpha"]),
    ("paths", ["expected BASE OTHER OUT"]),
    pytest.param("cuda", ["no CUDA device"], marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is present")),
])
def test_errors_are_one_line_and_write_nothing(ckpts, tmp_path, case, fragments):
    """(Every kind of bad input is covered in-process by test_checkpoint_errors.py; here,
    how the command reports a few, and the command line's own mistakes.)"""
    base, other, out = ckpts["qwen_a"], ckpts["qwen_b"], tmp_path / "out"
    extra = ["--alpha", "0.9"]
    if case == "missing":
        base = tmp_path / "missing"
    elif case == "bin":
        base = tmp_path / "bin"
        base.mkdir()
        torch.save({"w": torch.zeros(1)}, base / "pytorch_model.bin")
    elif case == "keys":
        base = ckpts["qwen_untied"]
    elif case == "alpha-text":
        extra = ["--alpha", "high"]
    elif case == "no-alpha":
        extra = []
    elif case == "cuda":
        extra += ["--device", "cuda"]
    args = ["merge", base, other, out, *extra] if case != "paths" else ["merge", base, "--alpha",
                                                                         "0.9"]
    before = set(tmp_path.iterdir())
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modkern merge: error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert set(tmp_path.iterdir()) == before and not out.exists()


def test_keys_mismatch_allowed_with_no_strict(ckpts, tmp_path):
    r = run_cli("merge", ckpts["qwen_untied"], ckpts["qwen_a"], tmp_path / "out", "--alpha",
                "0.9", "--no-strict")
    assert r.returncode == 0, r.stderr
    assert "1 copied" in r.stdout


def _start_slow_merge(base, other, out, *extra):
    env = dict(os.environ, MODKERN_TEST_WRITE_DELAY="0.25")
    return subprocess.Popen([sys.executable, "-m", "modkern", "merge", str(base), str(other),
                             str(out), "--alpha", "0.9", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_writing(parent: Path, out: Path, proc, timeout=60.0) -> Path:
    """The temporary folder, once it holds a shard with bytes in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for tmp in parent.glob(f".{out.name}.modkern-tmp-*"):
            if any(f.stat().st_size > 0 for f in tmp.glob("*.safetensors")):
                return tmp
        time.sleep(0.05)
    raise AssertionError("the merge never started writing")


def test_sigkill_mid_merge_leaves_no_out(ckpts, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_merge(ckpts["llama_a"], ckpts["llama_b"], out)
    tmp = _wait_until_writing(tmp_path, out, proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert tmp.exists()  # SIGKILL cannot clean up: the next merge into OUT does
    r = run_cli("merge", ckpts["llama_a"], ckpts["llama_b"], out, "--alpha", "0.9")
    assert r.returncode == 0, r.stderr
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigkill_with_force_keeps_previous_out(ckpts, tmp_path):
    out = tmp_path / "out"
    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], out, 0.3, progress=False)
    before = _files(out)
    proc = _start_slow_merge(ckpts["llama_a"], ckpts["llama_b"], out, "--force")
    _wait_until_writing(tmp_path, out, proc)
    proc.kill()
    proc.communicate()
    assert _files(out) == before


def test_sigterm_cleans_up(ckpts, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_merge(ckpts["llama_a"], ckpts["llama_b"], out)
    _wait_until_writing(tmp_path, out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_when_asked(ckpts, tmp_path, capsys):
    merge_checkpoints(ckpts["qwen_a"], ckpts["qwen_b"], tmp_path / "out", 0.9, progress=True)
    err = capsys.readouterr().err
    assert "26/26 tensors" in err and "100%" in err


def test_help_lists_every_option():
    r = run_cli("merge", "--help")
    assert r.returncode == 0
    for opt in ("--alpha", "--config", "--recipe", "--include", "--exclude", "--no-strict",
                "--precision", "--vocab", "--device", "--dtype", "--max-shard-size", "--force",
                "--quiet"):
        assert opt in r.stdout
