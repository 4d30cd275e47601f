"""merge_checkpoints on tiny real Qwen2 / Llama checkpoints: the result equals
merge_state_dicts on the loaded state dicts bit for bit, loads with transformers, records
its recipe, and reads OTHER only where it selects."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _checkpoints import ckpts, load_folder  # noqa: F401  (session fixture)

import modkern
from modkern.checkpoint.job import open_merge
from modkern.checkpoint.merge import merge_checkpoints
from modkern.checkpoint.options import MergeOptions
from modkern.checkpoint.folder import INDEX, SINGLE
from modkern.merging.state_dict import MergeStats, merge_state_dicts
from modkern.checkpoint.paper_config import load_paper_config

PAIRS = [("qwen_a", "qwen_b"), ("llama_a", "llama_b")]


@pytest.mark.parametrize("pair", PAIRS, ids=["qwen-tied", "llama-untied"])
@pytest.mark.parametrize("kw", [
    {"alpha": 0.9},
    {"alpha": 0.5, "precision": "reference", "include": "mlp"},
    {"alpha": {"layers.0.": 0.7, "*": 0.95}, "exclude": ["embed"]},
    {"alpha": 0.0},
    {"alpha": 1.0},
], ids=["a0.9", "reference-mlp", "per-layer", "a0", "a1"])
def test_equals_merge_state_dicts(ckpts, tmp_path, pair, kw):
    base, other = ckpts[pair[0]], ckpts[pair[1]]
    report = merge_checkpoints(base, other, tmp_path / "out", progress=False, **kw)
    sd1, sd2 = load_folder(base), load_folder(other)
    stats = MergeStats()
    expected = merge_state_dicts(sd1, sd2, stats=stats, **kw)
    got = load_folder(tmp_path / "out")
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    assert report.tensors_merged == stats.tensors_merged
    assert report.tensors_copied == stats.tensors_carried
    assert report.elements_taken == stats.elements_taken
    assert report.taken_by_key == stats.taken_by_key
    assert report.bytes_read_base == report.bytes_base  # BASE read once, whole
    assert report.bytes_read_other <= report.bytes_other


def test_against_elementwise_formula(ckpts, tmp_path):
    """Independent of merge_state_dicts: the float64 formula of docs/design.md 1.1 per tensor."""
    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "out", 0.8,
                      progress=False)
    sd1, sd2, got = (load_folder(ckpts["llama_a"]), load_folder(ckpts["llama_b"]),
                     load_folder(tmp_path / "out"))
    a32 = torch.tensor(0.8, dtype=torch.float32).double()
    for k, t1 in sd1.items():
        x = t1.float()
        mn, mx = x.min(), x.max()
        norm = torch.zeros_like(x) if mn == mx else (x - mn) / (mx - mn)  # float32 division
        want = torch.where(norm.double() < a32, t1, sd2[k])
        assert torch.equal(got[k], want), k


def test_loads_with_transformers_tied_and_untied(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    for base, other, tied in (("qwen_a", "qwen_b", True), ("llama_a", "llama_b", False)):
        out = tmp_path / base
        merge_checkpoints(ckpts[base], ckpts[other], out, 0.9, progress=False)
        model = AutoModelForCausalLM.from_pretrained(out)
        merged = merge_state_dicts(load_folder(ckpts[base]), load_folder(ckpts[other]), 0.9)
        state = model.state_dict()
        for k, t in merged.items():
            assert torch.equal(state[k], t), k
        same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert same == tied
        if not tied:
            assert torch.equal(model.lm_head.weight, merged["lm_head.weight"])
        assert "lm_head.weight" not in load_folder(out) or not tied
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(logits).all()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied from BASE as is
        assert (tmp_path / "qwen_a" / name).read_bytes() == \
            (ckpts["qwen_a"] / name).read_bytes()
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "qwen_a")
    assert tok("w1 w2")["input_ids"] == [4, 5]


def test_output_layout_and_recipe(ckpts, tmp_path):
    out = tmp_path / "out"
    report = merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], out, {"mlp": 0.8, "*": 0.9},
                               max_shard_size="40KB", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", INDEX, "modkern_recipe.yaml", "README.md"} <= names
    index = json.loads((out / INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= names
    assert (out / "config.json").read_bytes() == (ckpts["llama_a"] / "config.json").read_bytes()
    recipe = yaml.safe_load((out / "modkern_recipe.yaml").read_text())
    assert recipe["modkern_version"] == modkern.__version__
    assert recipe["alpha"] == {"mlp": 0.8, "*": 0.9}
    assert recipe["precision"] == "exact"
    files = recipe["inputs"]["base"]["files"]
    assert all(len(e.get("sha256") or e["header_sha256"]) == 64 for e in files.values())
    assert recipe["result"]["elements_taken"] == report.elements_taken
    assert "MoD merge" in (out / "README.md").read_text()
    assert str(out) in report.summary() and "OTHER" in report.summary()
    # A single shard when it fits.
    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "one", 0.9, progress=False)
    assert (tmp_path / "one" / SINGLE).is_file() and not (tmp_path / "one" / INDEX).exists()


def test_dtype_cast_updates_config(ckpts, tmp_path):
    out = tmp_path / "out"
    merge_checkpoints(ckpts["qwen_a"], ckpts["qwen_b"], out, 0.9, dtype="float32",
                      progress=False)
    expected = merge_state_dicts(load_folder(ckpts["qwen_a"]), load_folder(ckpts["qwen_b"]), 0.9)
    got = load_folder(out)
    for k, t in expected.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], t.float()), k
    config = json.loads((out / "config.json").read_text())
    assert "float32" in (config.get("torch_dtype"), config.get("dtype"))


def test_non_strict_carries_base_extra_keys(ckpts, tmp_path):
    out = tmp_path / "out"
    report = merge_checkpoints(ckpts["qwen_untied"], ckpts["qwen_a"], out, 0.9, strict=False,
                               progress=False)
    got, base = load_folder(out), load_folder(ckpts["qwen_untied"])
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    assert report.tensors_copied == 1


def test_force_replaces_previous(ckpts, tmp_path):
    out = tmp_path / "out"
    merge_checkpoints(ckpts["qwen_a"], ckpts["qwen_b"], out, 0.2, progress=False)
    merge_checkpoints(ckpts["qwen_a"], ckpts["qwen_b"], out, 0.9, force=True, progress=False)
    expected = merge_state_dicts(load_folder(ckpts["qwen_a"]), load_folder(ckpts["qwen_b"]), 0.9)
    got = load_folder(out)
    assert all(torch.equal(got[k], t) for k, t in expected.items())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def _released_code(t1: torch.Tensor, t2: torch.Tensor, w0: float) -> torch.Tensor:
    """The paper's released formula, in the tensors' own dtype."""
    mn, mx = torch.min(t1), torch.max(t1)
    norm = torch.zeros_like(t1) if mn == mx else (t1 - mn) / (mx - mn)
    return torch.where(norm < w0, t1, t2)


def test_paper_config_reproduces_released_code(ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(ckpts["qwen_a"].parent)
    cfg = tmp_path / "mod_config.yml"
    cfg.write_text("base_model: qwen_a\nexperts:\n  - source_model: qwen_a\n"
                   "  - source_model: qwen_b\nweights: [0.9, 0.1]\n"
                   "model_kwargs:\n  torch_dtype: bfloat16\n")
    pc = load_paper_config(cfg)
    assert pc.alpha == 0.9 and pc.base.name == "qwen_a" and pc.other.name == "qwen_b"
    merge_checkpoints(pc.base, pc.other, tmp_path / "out", pc.alpha, include="mlp",
                      precision="reference", progress=False)
    sd1, sd2, got = load_folder(ckpts["qwen_a"]), load_folder(ckpts["qwen_b"]), \
        load_folder(tmp_path / "out")
    for k, t1 in sd1.items():
        want = _released_code(t1, sd2[k], 0.9) if "mlp" in k else t1
        assert torch.equal(got[k], want), k


@pytest.mark.parametrize("text, match", [
    ("experts:\n  - source_model: qwen_a\nweights: [1.0]\n", "two entries"),
    ("experts:\n  - source_model: qwen_a\n  - source_model: qwen_b\nweights: [0.9, 0.2]\n",
     "sum to 1"),
    ("experts:\n  - source_model: qwen_a\n  - source_model: Qwen/Qwen2.5-1.5B\n"
     "weights: [0.9, 0.1]\n", "not a local folder"),
])
def test_paper_config_errors(ckpts, tmp_path, monkeypatch, text, match):
    monkeypatch.chdir(ckpts["qwen_a"].parent)
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    with pytest.raises(modkern.ModkernError, match=match):
        load_paper_config(cfg)


def test_other_in_another_dtype(tmp_path):
    """OTHER stored in float32, BASE in bf16: OTHER's elements are read at their own width
    and rounded to BASE's dtype, as merge_state_dicts does."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(5)
    sd1 = {"w": (torch.randn(300, 70, generator=g) * 0.02).to(torch.bfloat16)}
    sd2 = {"w": torch.randn(300, 70, generator=g) * 0.02}
    for name, sd in (("base", sd1), ("other", sd2)):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    merge_checkpoints(tmp_path / "base", tmp_path / "other", tmp_path / "out", 0.6,
                      progress=False)
    got = load_folder(tmp_path / "out")["w"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, merge_state_dicts(sd1, sd2, 0.6)["w"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_tensor_equals_the_in_memory_select(ckpts, tmp_path, backend):
    """The per-tensor route of the checkpoint merge (BASE's tensor moved to the merge's
    device and selected there, OTHER read at the selected elements only), on each engine:
    every tensor equals merge_state_dicts of the loaded pair, with the same count taken.
    (No GPU here: the CPU is the device; on one, the same code runs there.)"""
    if backend == "triton":
        pytest.importorskip("triton")
    for alpha, precision in ((0.9, "exact"), (0.3, "reference")):
        options = MergeOptions(alpha, precision=precision, backend=backend)
        with open_merge(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "out", options) as job:
            for name in job.ck1.names():
                t1 = job.ck1.where[name].read_tensor(name)
                t2 = job.ck2.where[name].read_tensor(name)
                report, stats = job.new_report(), MergeStats()
                merged = job.merge_one(name, t1.clone(), report)
                expected = merge_state_dicts({name: t1}, {name: t2}, alpha,
                                             precision=precision, backend="torch",
                                             stats=stats)[name]
                assert torch.equal(merged, expected), name
                assert report.taken_by_key == stats.taken_by_key, name


def test_public_names():
    assert modkern.merge_checkpoints is merge_checkpoints
    assert "MergeReport" in dir(modkern)
