"""Models whose vocabularies differ only in padded rows (embed_tokens and lm_head of
151,936 vs 152,064 rows, as Qwen2.5 sizes have): refused by default with a message naming
the option; with vocab="common" (--vocab common) the rows both models have are merged, the
min, max and threshold taken over model 1's common rows, and model 1's further rows are
kept as they are. Checked against the numpy oracle, in memory (out of place, in place,
tied) and for checkpoints (one file, shards, the CLI, a recipe rerun, distributed)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _checkpoints import ckpts, load_folder, padded, run_cli  # noqa: F401  (session fixture)

import modkern
from modkern import CheckpointError, OptionError, ShapeMismatchError
from oracle_select import assert_bits_equal, oracle_select

def model(seed: int, rows: int, tied: bool = False, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 0.02).to(
            torch.bfloat16).to(device)

    embed = rnd(rows, 24)
    return {"model.embed_tokens.weight": embed,
            "model.layers.0.mlp.up_proj.weight": rnd(40, 24),
            "model.norm.weight": rnd(24),
            "lm_head.weight": embed if tied else rnd(rows, 24),
            "lm_head.bias": rnd(rows)}


def check_common(out: dict, sd1: dict, sd2: dict, alpha: float) -> None:
    """out equals the oracle on every pair: on the common rows of the padded tensors (model
    1's further rows kept bit for bit), on the whole of the others."""
    for k, t1 in sd1.items():
        t2 = sd2[k]
        assert out[k].shape == t1.shape and out[k].dtype == t1.dtype, k
        c = min(t1.shape[0], t2.shape[0]) if t1.dim() else None
        if t1.shape == t2.shape:
            assert_bits_equal(out[k], oracle_select(t1, t2, alpha), k)
            continue
        assert_bits_equal(out[k][:c], oracle_select(t1[:c], t2[:c], alpha), f"{k} common")
        assert_bits_equal(out[k][c:], t1[c:], f"{k}: model 1's further rows kept")


@pytest.mark.parametrize("rows1, rows2", [(152, 150), (150, 152), (150, 0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_state_dicts(rows1, rows2, inplace, backend, device):
    sd1, sd2 = model(1, rows1, device=device), model(2, rows2, device=device)
    if rows1 > rows2:  # a huge value in model 1's extra rows: not part of the min/max
        sd1["model.embed_tokens.weight"][-1, 0] = 1e3
    before = {k: v.clone() for k, v in sd1.items()}
    stats = modkern.MergeStats()
    out = modkern.merge_state_dicts(sd1, sd2, 0.9, vocab="common", inplace=inplace,
                                    backend=backend, stats=stats)
    assert (out is sd1) == inplace
    check_common(out, before, sd2, 0.9)
    common = min(rows1, rows2)
    assert stats.elements_merged == 40 * 24 + 24 + common * (24 + 24 + 1)


def test_tied_in_place(backend, device):
    sd1, sd2 = model(3, 160, True, device), model(4, 151, True, device)
    expected = modkern.merge_state_dicts(sd1, sd2, 0.8, vocab="common", backend=backend)
    check_common(expected, sd1, sd2, 0.8)
    out = modkern.merge_state_dicts(sd1, sd2, 0.8, vocab="common", inplace=True,
                                    backend=backend)
    for k in out:
        assert_bits_equal(out[k], expected[k], k)
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]


def test_refused_by_default_naming_the_option():
    sd1, sd2 = model(5, 152), model(6, 150)
    before = {k: v.clone() for k, v in sd1.items()}
    for inplace in (False, True):
        with pytest.raises(ShapeMismatchError) as e:
            modkern.merge_state_dicts(sd1, sd2, 0.9, inplace=inplace)
        msg = str(e.value)
        assert "'model.embed_tokens.weight'" in msg and "[152, 24]" in msg and "[150, 24]" in msg
        assert 'vocab="common"' in msg and "--vocab common" in msg
    for k in sd1:
        assert_bits_equal(sd1[k], before[k], k)
    with pytest.raises(OptionError, match="vocab must be one of"):
        modkern.merge_state_dicts(sd1, sd2, 0.9, vocab="padded")


@pytest.mark.parametrize("shape2", [(152, 23), (24, 152), (152,), (152, 24, 1)])
def test_other_shape_differences_are_still_refused(shape2):
    sd1, sd2 = model(7, 152), model(8, 152)
    sd2["model.embed_tokens.weight"] = torch.zeros(shape2, dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatchError) as e:
        modkern.merge_state_dicts(sd1, sd2, 0.9, vocab="common")
    assert "shapes differ" in str(e.value) and "vocab" not in str(e.value)


# ---- checkpoints -------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["base padded, sharded", "other padded"])
def test_checkpoints(ckpts, tmp_path, direction):
    big = padded(ckpts["llama_a"], tmp_path / "padded", 136)  # sharded
    base, other = (big, ckpts["llama_b"]) if direction.startswith("base") else \
        (ckpts["llama_b"], big)
    out = tmp_path / "out"
    report = modkern.merge_checkpoints(base, other, out, 0.8, vocab="common", progress=False)
    sd1, sd2 = load_folder(base), load_folder(other)
    got = load_folder(out)
    check_common(got, sd1, sd2, 0.8)
    expected = modkern.merge_state_dicts(sd1, sd2, 0.8, vocab="common")
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert report.tensors_merged == len(sd1)
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((base / "config.json").read_text())  # BASE's config, its vocab_size
    recipe = yaml.safe_load((out / "modkern_recipe.yaml").read_text())
    assert recipe["vocab"] == "common"
    assert recipe["common_rows"] == {"model.embed_tokens.weight": 128, "lm_head.weight": 128}


def test_checkpoints_refused_by_default(ckpts, tmp_path):
    big = padded(ckpts["llama_a"], tmp_path / "padded", 136)
    with pytest.raises(CheckpointError) as e:
        modkern.merge_checkpoints(big, ckpts["llama_b"], tmp_path / "out", 0.8)
    assert "vocab_size differs" in str(e.value) and "--vocab common" in str(e.value)
    (big / "config.json").write_text((ckpts["llama_b"] / "config.json").read_text())
    with pytest.raises(ShapeMismatchError) as e:
        modkern.merge_checkpoints(big, ckpts["llama_b"], tmp_path / "out", 0.8)
    msg = str(e.value)
    assert "model.embed_tokens.weight" in msg and "[136, 64]" in msg and "[128, 64]" in msg
    assert "--vocab common" in msg and 'vocab="common"' in msg
    assert not (tmp_path / "out").exists()


def test_cli_option_and_recipe_rerun(ckpts, tmp_path):
    big = padded(ckpts["llama_a"], tmp_path / "padded", 136)
    r = run_cli("merge", big, ckpts["llama_b"], tmp_path / "refused", "--alpha", "0.9")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "--vocab common" in r.stderr and not (tmp_path / "refused").exists()
    r = run_cli("merge", big, ckpts["llama_b"], tmp_path / "out", "--alpha", "0.9",
                "--vocab", "common", "--quiet")
    assert r.returncode == 0, r.stderr
    rerun = run_cli("merge", big, ckpts["llama_b"], tmp_path / "again", "--quiet", "--recipe",
                    tmp_path / "out" / "modkern_recipe.yaml")
    assert rerun.returncode == 0, rerun.stderr
    first, second = load_folder(tmp_path / "out"), load_folder(tmp_path / "again")
    assert all(torch.equal(first[k], second[k]) for k in first)
    check_common(first, load_folder(big), load_folder(ckpts["llama_b"]), 0.9)
