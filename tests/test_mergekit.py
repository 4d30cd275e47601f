"""MoD inside mergekit (`merge_method: mod`): a mergekit merge of two tiny local Qwen2
checkpoints must equal `modkern.merge_state_dicts` on the same weights, bit for bit.

The expected per-tensor alpha is computed here from mergekit's documented gradient rule
(layer i of L gets t = i / (L - 1), values interpolated linearly between the listed
points; weights outside the layers get t = 0), not by asking mergekit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit", reason="mergekit is not installed (pip install "
                    "\"modkern[mergekit]\"); the mergekit integration is not tested")

from mergekit.merge_methods import TensorGroup  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import modkern  # noqa: E402
from modkern.integrations import mergekit as mk  # noqa: E402

LAYERS = 3
# bf16(0.9) = 0.8984375: an element of exactly that value, in a tensor spanning [0, 1],
# is kept by the float32 formula (0.8984375 < 0.9) and taken from model 2 by the released
# code's bf16 arithmetic (0.8984375 < 0.8984375 is false)
EDGE = 0.8984375


def _save_model(path: Path, seed: int, edit=None, tied: bool = False) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    if edit is not None:
        weights = path / "model.safetensors"
        sd = load_file(weights)
        edit(sd)
        save_file(sd, weights, metadata={"format": "pt"})


def _edge_norm(sd: dict) -> None:
    """Give model 1's final norm a [0, 1] range with an element at EDGE (see above)."""
    w = torch.linspace(0.0, 1.0, sd["model.norm.weight"].numel())
    w[5] = EDGE
    sd["model.norm.weight"] = w.to(torch.bfloat16)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mergekit-models")
    _save_model(root / "a", seed=1, edit=_edge_norm)
    _save_model(root / "b", seed=2)
    return root / "a", root / "b"


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _config(tmp_path: Path, models: tuple[Path, Path], parameters: str) -> Path:
    a, b = models
    path = tmp_path / "mod.yml"
    path.write_text(f"merge_method: mod\nbase_model: {a}\nmodels:\n  - model: {b}\n"
                    f"parameters:\n{parameters}")
    return path


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _layer_alpha(lo: float, hi: float):
    def rule(name: str) -> float:
        m = re.search(r"\.layers\.(\d+)\.", name)
        t = int(m.group(1)) / (LAYERS - 1) if m else 0.0
        return (1 - t) * lo + t * hi
    return rule


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.view(torch.int16), w.view(torch.int16)), name  # bit for bit


def _run_inprocess(argv: list[str]) -> int:
    return mk.main(argv)


def test_mergekit_yaml_cli_matches_merge_state_dicts(tmp_path, models):
    """As a user runs it: the console script in a subprocess, alpha a per-layer gradient."""
    config = _config(tmp_path, models, "  alpha: [0.8, 0.9]\n")
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("modkern-mergekit-yaml")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m",
                                                  "modkern.integrations.mergekit"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([*cmd, str(config), str(out), "--lazy-unpickle"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sd1, sd2 = _load(models[0]), _load(models[1])
    stats = modkern.MergeStats()
    want = modkern.merge_state_dicts(sd1, sd2, _layer_alpha(0.8, 0.9), stats=stats)
    assert stats.elements_taken > 0 and stats.tensors_merged == len(sd1)
    _assert_same(_load(out), want)
    assert (out / "config.json").exists()


def test_python_m_entry_point(monkeypatch, capsys):
    """`python -m modkern.integrations.mergekit --help` runs mergekit-yaml's CLI (run
    in-process with runpy: a second interpreter would cost seconds of imports)."""
    import runpy
    import warnings

    monkeypatch.setattr(sys, "argv", ["modkern.integrations.mergekit", "--help"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # module already imported
        with pytest.raises(SystemExit) as done:
            runpy.run_module("modkern.integrations.mergekit", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "CONFIG_FILE" in out and "OUT_PATH" in out


@pytest.mark.parametrize("precision", ["exact", "reference"])
def test_precision_parameter(tmp_path, models, precision):
    config = _config(tmp_path, models, f"  alpha: 0.9\n  precision: {precision}\n")
    assert _run_inprocess([str(config), str(tmp_path / "out")]) == 0
    sd1, sd2 = _load(models[0]), _load(models[1])
    want = modkern.merge_state_dicts(sd1, sd2, 0.9, precision=precision)
    got = _load(tmp_path / "out")
    _assert_same(got, want)
    # the edge element tells the two precisions apart
    picked = got["model.norm.weight"][5]
    expected = sd1["model.norm.weight"][5] if precision == "exact" else \
        sd2["model.norm.weight"][5]
    assert torch.equal(picked, expected)


def test_tied_embeddings(tmp_path, models):
    """Tied models store no lm_head: the output has none either, like merge_state_dicts."""
    a, b = tmp_path / "ta", tmp_path / "tb"
    _save_model(a, seed=3, tied=True)
    _save_model(b, seed=4, tied=True)
    assert "lm_head.weight" not in _load(a)
    config = _config(tmp_path, (a, b), "  alpha: [0.9, 0.8]\n")
    assert _run_inprocess([str(config), str(tmp_path / "out")]) == 0
    _assert_same(_load(tmp_path / "out"),
                 modkern.merge_state_dicts(_load(a), _load(b), _layer_alpha(0.9, 0.8)))


def test_filtered_alpha_and_keep_base_match_include(tmp_path, models):
    """The paper's recipe (merge only `mlp`) through mergekit filters and `keep_base`;
    alpha per filter equals merge_state_dicts' alpha mapping."""
    params = ("  alpha:\n    - filter: gate_proj\n      value: 0.7\n    - value: 0.9\n"
              "  keep_base:\n    - filter: mlp\n      value: false\n    - value: true\n")
    config = _config(tmp_path, models, params)
    assert _run_inprocess([str(config), str(tmp_path / "out")]) == 0
    sd1, sd2 = _load(models[0]), _load(models[1])
    want = modkern.merge_state_dicts(sd1, sd2, {"gate_proj": 0.7, "*": 0.9}, include="mlp")
    _assert_same(_load(tmp_path / "out"), want)


def test_backend_parameter_triton(tmp_path, models, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    from modkern.ops import select_engine

    used = []
    engine = select_engine.engine_for
    monkeypatch.setattr(select_engine, "engine_for", lambda backend: used.append(backend) or
                        engine(backend))
    config = _config(tmp_path, models, "  alpha: [0.85, 0.95]\n  backend: triton\n")
    assert _run_inprocess([str(config), str(tmp_path / "out")]) == 0
    assert used and set(used) == {"triton"}
    sd1, sd2 = _load(models[0]), _load(models[1])
    _assert_same(_load(tmp_path / "out"),
                 modkern.merge_state_dicts(sd1, sd2, _layer_alpha(0.85, 0.95),
                                           backend="torch"))


def test_method_matches_reference_on_fp32_tensors():
    """The registered method through mergekit's own tensor API, against the spec."""
    from mergekit.merge_methods import merge_tensors

    gen = torch.Generator().manual_seed(0)
    t1 = torch.randn(64, 33, generator=gen) * 0.02
    t2 = torch.randn(64, 33, generator=gen) * 0.02
    method = mk.register()
    got = merge_tensors([t1, t2], method, parameters={"alpha": 0.75}, base_index=0,
                        name="w")
    assert torch.equal(got, modkern.mod_select_reference(t1, t2, 0.75))
    # base_index picks model 1, whatever the input order
    swapped = merge_tensors([t2, t1], method, parameters={"alpha": 0.75}, base_index=1,
                            name="w")
    assert torch.equal(swapped, got)


def test_register_is_idempotent_and_refuses_a_foreign_mod(monkeypatch):
    from mergekit.merge_methods import get, merge_method

    assert mk.register() is mk.register()
    assert get("mod") is mk.MOD_METHOD

    def other(group: TensorGroup, scale: float) -> torch.Tensor:
        return group.entries[0].tensor * scale

    # as if another package had taken the name "mod" first
    monkeypatch.setattr(mk, "MOD_METHOD", merge_method(other, name="mod"))
    with pytest.raises(RuntimeError, match="already has a merge method named 'mod'"):
        mk.register()


def test_bad_alpha_names_the_tensor(tmp_path, models, capsys):
    config = _config(tmp_path, models, "  alpha: 1.5\n")
    assert _run_inprocess([str(config), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "modkern-mergekit-yaml: error:" in err and "alpha for tensor" in err
    assert "1.5" in err


def test_non_finite_base_names_tensor_and_model(tmp_path, models):
    bad = tmp_path / "bad"
    shutil.copytree(models[0], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    config = _config(tmp_path, (bad, models[1]), "  alpha: 0.9\n")
    with pytest.raises(modkern.NonFiniteError,
                       match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model 1"):
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
        import yaml

        mk.register()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())),
                  str(tmp_path / "out"), options=MergeOptions(quiet=True))
