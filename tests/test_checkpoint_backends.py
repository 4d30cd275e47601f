"""The checkpoint merge on each engine of the select pipeline: `backend="triton"` (the
kernels, here under Triton's interpreter: the route a CUDA device takes) writes the same
bytes as the torch route, counts the same, reads OTHER at the same elements, and raises
the same errors; and it really runs the kernels, not torch ops."""

from __future__ import annotations

import pytest
import torch
from _checkpoints import ckpts, run_cli  # noqa: F401  (session fixture)
from safetensors.torch import save_file

from modkern.checkpoint.merge import merge_checkpoints
from modkern.checkpoint.options import MergeOptions
from modkern.errors import BackendError, NonFiniteError
from modkern.ops import select_torch

pytest.importorskip("triton", reason="triton is not installed")
import modkern.kernels.mod_select as kernels  # noqa: E402

CASES = {
    "qwen-a0.9": ("qwen_a", "qwen_b", {"alpha": 0.9}),
    "llama-reference-f32": ("llama_a", "llama_b", {"alpha": 0.3, "precision": "reference",
                                                   "dtype": "float32"}),
    "llama-per-layer": ("llama_a", "llama_b", {"alpha": {"layers.0.": 0.6, "*": 0.95},
                                               "include": ["mlp", "embed", "norm"]}),
    "qwen-a0": ("qwen_a", "qwen_b", {"alpha": 0.0}),
}


def _weights(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.endswith((".safetensors", ".index.json"))}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_route_is_bit_identical_to_torch(ckpts, tmp_path, case):
    base, other, kw = CASES[case]
    reports = {}
    for backend in ("torch", "triton"):
        reports[backend] = merge_checkpoints(ckpts[base], ckpts[other], tmp_path / backend,
                                             backend=backend, progress=False, **kw)
    assert _weights(tmp_path / "triton") == _weights(tmp_path / "torch")
    torch_r, triton_r = reports["torch"], reports["triton"]
    assert triton_r.taken_by_key == torch_r.taken_by_key
    assert (triton_r.tensors_merged, triton_r.tensors_copied, triton_r.elements_taken) == \
        (torch_r.tensors_merged, torch_r.tensors_copied, torch_r.elements_taken)
    assert triton_r.bytes_read_other == torch_r.bytes_read_other  # the same elements read


def test_triton_route_runs_the_kernels(ckpts, tmp_path, monkeypatch):
    calls = dict.fromkeys(["kernel minmax", "kernel patch", "kernel count", "kernel emit",
                           "torch minmax", "torch hot blocks", "torch patch"], 0)

    def spy(module, name, key):
        real = getattr(module, name)

        def counted(*args, **kw):
            calls[key] += 1
            return real(*args, **kw)
        monkeypatch.setattr(module, name, counted)

    spy(kernels, "minmax", "kernel minmax")
    spy(kernels, "patch", "kernel patch")
    spy(kernels, "count_selected", "kernel count")
    spy(kernels, "emit_selected", "kernel emit")
    spy(select_torch, "minmax", "torch minmax")
    spy(select_torch, "hot_blocks", "torch hot blocks")
    spy(select_torch, "patch_where", "torch patch")
    report = merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "out", 0.9,
                               backend="triton", progress=False)
    # alpha 0.9: OTHER is read at the indices the compaction kernels emit; no torch op
    merged = report.tensors_merged
    assert calls["kernel emit"] > 0  # (constant norms take nothing: no group)
    assert calls == {"kernel minmax": merged, "kernel patch": 0, "kernel count": merged,
                     "kernel emit": calls["kernel emit"], "torch minmax": 0,
                     "torch hot blocks": 0, "torch patch": 0}
    # alpha 0.2: the groups take most of their elements, so OTHER's ranges are read whole
    # and patched by the fused kernel, without indices
    calls.update(dict.fromkeys(calls, 0))
    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "low", 0.2,
                      backend="triton", progress=False)
    assert calls["kernel patch"] > 0 and calls["kernel emit"] == 0
    assert calls["torch minmax"] == calls["torch patch"] == 0
    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], tmp_path / "cpu", 0.2,
                      progress=False)  # auto on the CPU: the torch engine
    assert calls["torch minmax"] > 0 and calls["torch patch"] == calls["kernel patch"]


def test_auto_backend_is_torch_on_the_cpu():
    assert MergeOptions(0.9).resolved_backend == "torch"
    assert MergeOptions(0.9, backend="triton").resolved_backend == "triton"
    with pytest.raises(BackendError, match="backend must be one of"):
        MergeOptions(0.9, backend="cuda")


@pytest.mark.parametrize("where", ["base", "other"])
def test_triton_route_raises_the_same_errors(tmp_path, where):
    g = torch.Generator().manual_seed(0)
    sds = [{"w": (torch.randn(70, 130, generator=g) * 0.02).to(torch.bfloat16)}
           for _ in range(2)]
    top = int(sds[0]["w"].float().argmax())  # always taken from OTHER
    sds[0 if where == "base" else 1]["w"].view(-1)[top] = float("nan")
    for name, sd in zip(("base", "other"), sds):
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    messages = []
    for backend in ("torch", "triton"):
        with pytest.raises(NonFiniteError) as err:
            merge_checkpoints(tmp_path / "base", tmp_path / "other", tmp_path / backend, 0.9,
                              backend=backend, progress=False)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert f"flat index {top}" in messages[0] and where.upper() in messages[0]


def test_backend_option_of_the_command(ckpts, tmp_path):
    r = run_cli("merge", ckpts["qwen_a"], ckpts["qwen_b"], tmp_path / "triton", "--alpha",
                "0.9", "--backend", "triton", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("merge", ckpts["qwen_a"], ckpts["qwen_b"], tmp_path / "torch", "--alpha",
                "0.9", "--backend", "torch", "-q")
    assert r.returncode == 0, r.stderr
    assert _weights(tmp_path / "triton") == _weights(tmp_path / "torch")
    # without the interpreter, Triton on the CPU is refused in one line, nothing written
    r = run_cli("merge", ckpts["qwen_a"], ckpts["qwen_b"], tmp_path / "no", "--alpha", "0.9",
                "--backend", "triton", env={"TRITON_INTERPRET": "0"})
    assert r.returncode == 2 and not (tmp_path / "no").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRITON_INTERPRET=1" in lines[0], r.stderr
    assert "--backend" in run_cli("merge", "--help").stdout
