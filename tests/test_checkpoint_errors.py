"""Bad input to merge_checkpoints: one clear exception naming the file, the tensor and what
was expected, and nothing written (no OUT, no temporary folder; a previous OUT untouched)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from _checkpoints import ckpts, load_folder  # noqa: F401  (session fixture)
from safetensors.torch import save_file

import modkern.checkpoint.out_folder as ckpt_mod
from modkern.checkpoint.merge import merge_checkpoints
from modkern.errors import (AlphaError, CheckpointError, KeyMismatchError, NonFiniteError,
                            ShapeMismatchError)


def _weights(seed: int, **shapes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}


def _folder(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(parent: Path, keep: set[str]) -> None:
    left = {p.name for p in parent.iterdir()} - keep
    assert not left, f"left behind: {left}"


def _expect(tmp_path, base, other, err, *fragments, keep=(), **kw):
    out = tmp_path / "out"
    with pytest.raises(err) as info:
        merge_checkpoints(base, other, out, kw.pop("alpha", 0.9), progress=False, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    _assert_nothing_written(tmp_path, set(keep) | {p.name for p in (Path(base), Path(other))
                                                    if p.parent == tmp_path})
    return msg


def test_missing_folder(ckpts, tmp_path):
    _expect(tmp_path, tmp_path / "nope", ckpts["qwen_b"], CheckpointError, "nope",
            "no such folder", "expected")


def test_missing_index_and_weights(ckpts, tmp_path):
    (tmp_path / "empty").mkdir()
    _expect(tmp_path, tmp_path / "empty", ckpts["qwen_b"], CheckpointError,
            "model.safetensors.index.json", "expected")


def test_missing_shard(ckpts, tmp_path):
    other = _copy(ckpts["qwen_b"], tmp_path / "other")
    victim = sorted(other.glob("model-*.safetensors"))[1]
    victim.unlink()
    _expect(tmp_path, ckpts["qwen_a"], other, CheckpointError, victim.name, "missing",
            "tensor '")


@pytest.mark.parametrize("cut", [100, 10_000])
def test_truncated_file(ckpts, tmp_path, cut):
    base = _copy(ckpts["qwen_a"], tmp_path / "base")
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-cut])
    _expect(tmp_path, base, ckpts["qwen_b"], CheckpointError, str(f), "truncated",
            "tensor '")


def test_truncated_to_nothing(ckpts, tmp_path):
    base = _copy(ckpts["qwen_a"], tmp_path / "base")
    (base / "model.safetensors").write_bytes(b"\x05\x00")
    _expect(tmp_path, base, ckpts["qwen_b"], CheckpointError, "truncated")


def test_corrupt_header(ckpts, tmp_path):
    base = _copy(ckpts["qwen_a"], tmp_path / "base")
    f = base / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#garbage#!!!"
    f.write_bytes(bytes(data))
    _expect(tmp_path, base, ckpts["qwen_b"], CheckpointError, str(f), "corrupt")


def test_wrong_byte_length_in_header(tmp_path):
    base = _folder(tmp_path / "base", _weights(0, w=(8, 8)))
    f = base / "model.safetensors"
    data = f.read_bytes().replace(b'"shape":[8,8]', b'"shape":[8,9]')
    f.write_bytes(data)
    other = _folder(tmp_path / "other", _weights(1, w=(8, 8)))
    _expect(tmp_path, base, other, CheckpointError, "'w'", "corrupt")


def test_pickled_bin_only(ckpts, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(ckpts["qwen_a"] / "config.json", base)
    torch.save({"w": torch.zeros(2)}, base / "pytorch_model.bin")
    msg = _expect(tmp_path, base, ckpts["qwen_b"], CheckpointError, "pytorch_model.bin",
                  "safetensors", "save_pretrained")
    assert "safe_serialization=True" in msg


def test_architectures_differ(ckpts, tmp_path):
    _expect(tmp_path, ckpts["qwen_a"], ckpts["llama_b"], CheckpointError, "config.json",
            "architectures", "Qwen2ForCausalLM", "LlamaForCausalLM", "expected")


def test_shapes_differ(tmp_path):
    base = _folder(tmp_path / "base", _weights(0, a=(4, 8), b=(8, 8)))
    other = _folder(tmp_path / "other", _weights(1, a=(4, 8), b=(8, 4)))
    _expect(tmp_path, base, other, ShapeMismatchError, "tensor 'b'", "[8, 8]", "[8, 4]",
            str(base / "model.safetensors"))


def test_keys_in_one_model_only(ckpts, tmp_path):
    _expect(tmp_path, ckpts["qwen_untied"], ckpts["qwen_a"], KeyMismatchError,
            "'lm_head.weight'", "only in model 1", "--no-strict")


def test_non_finite_base(tmp_path):
    sd = _weights(0, a=(16, 16), b=(16, 16))
    sd["b"][3, 4] = float("nan")
    base = _folder(tmp_path / "base", sd)
    other = _folder(tmp_path / "other", _weights(1, a=(16, 16), b=(16, 16)))
    _expect(tmp_path, base, other, NonFiniteError, "BASE", "tensor 'b'", "nan",
            "index 52", "expected finite")


def test_non_finite_other_only_where_selected(tmp_path):
    sd1 = _weights(0, a=(16, 16))
    sd2 = _weights(1, a=(16, 16))
    top = int(sd1["a"].float().argmax())
    low = int(sd1["a"].float().argmin())
    sd2["a"].view(-1)[low] = float("inf")  # never selected at alpha 0.9: fine
    base = _folder(tmp_path / "base", sd1)
    other = _folder(tmp_path / "other", sd2)
    report = merge_checkpoints(base, other, tmp_path / "ok", 0.9, progress=False)
    assert report.elements_taken >= 1
    shutil.rmtree(tmp_path / "ok")
    sd2["a"].view(-1)[top] = float("inf")  # the maximum is always selected
    shutil.rmtree(other)
    other = _folder(tmp_path / "other", sd2)
    _expect(tmp_path, base, other, NonFiniteError, "OTHER", "tensor 'a'", "inf",
            f"index {top}", "expected finite")


@pytest.mark.parametrize("alpha, err, frag", [
    (1.5, AlphaError, "[0, 1]"), (-0.1, AlphaError, "[0, 1]"),
    (float("nan"), AlphaError, "[0, 1]"), ({"mlp": 0.9}, AlphaError, "no alpha pattern"),
    ({"mlp": 2.0, "*": 0.9}, AlphaError, "mlp"),
])
def test_bad_alpha(ckpts, tmp_path, alpha, err, frag):
    _expect(tmp_path, ckpts["qwen_a"], ckpts["qwen_b"], err, frag, alpha=alpha)


def test_out_is_or_inside_or_contains_an_input(ckpts, tmp_path):
    base = _copy(ckpts["qwen_a"], tmp_path / "models" / "base")
    before = sorted(p.name for p in base.iterdir())
    for out, frag in ((base, "is the BASE"), (base / "sub", "inside BASE"),
                      (tmp_path / "models", "contains BASE")):
        with pytest.raises(CheckpointError, match=frag):
            merge_checkpoints(base, ckpts["qwen_b"], out, 0.9, force=True, progress=False)
    with pytest.raises(CheckpointError, match="OTHER"):
        merge_checkpoints(ckpts["qwen_b"], base, base, 0.9, force=True, progress=False)
    assert sorted(p.name for p in base.iterdir()) == before


def test_out_exists_without_force(ckpts, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _expect(tmp_path, ckpts["qwen_a"], ckpts["qwen_b"], CheckpointError, "already exists",
            "--force", keep={"out"})
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_not_enough_disk_space(ckpts, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    _expect(tmp_path, ckpts["qwen_a"], ckpts["qwen_b"], CheckpointError, "not enough disk space",
            "expected")


def test_failure_mid_merge_keeps_previous_out(ckpts, tmp_path):
    """A merge that fails after it started writing (a NaN found late) removes its temporary
    folder and leaves the previous OUT as it was."""
    out = tmp_path / "out"
    merge_checkpoints(ckpts["llama_a"], ckpts["llama_b"], out, 0.9, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = _copy(ckpts["llama_b"], tmp_path / "other")
    sd = load_folder(other)
    last = list(sd)[-1]
    sd[last].view(-1)[:] = float("nan")
    (other / "model.safetensors").unlink()
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=last):
        merge_checkpoints(ckpts["llama_a"], other, out, 0.0, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _assert_nothing_written(tmp_path, {"out", "other"})


class _BytesPath:
    def __fspath__(self):
        return b"/tmp"


class _BrokenPath:
    def __fspath__(self):
        raise OSError("no path today")


@pytest.mark.parametrize("which", ["BASE", "OTHER", "OUT"])
@pytest.mark.parametrize("bad, fragment", [
    ("with\0nul", "contains a NUL byte"), (b"bytes", "a bytes path"), (None, "a NoneType"),
    (3, "a int"), ("", "an empty path"), (["a"], "a list"), (_BytesPath(), "a bytes path"),
    (_BrokenPath(), "__fspath__ failed"),
])
def test_path_arguments_of_the_wrong_kind(ckpts, tmp_path, which, bad, fragment):
    """Every path of the Python checkpoint API: one CheckpointError naming it, nothing
    written (a number would otherwise be taken for an open file descriptor)."""
    paths = {"BASE": ckpts["qwen_a"], "OTHER": ckpts["qwen_b"], "OUT": tmp_path / "out"}
    paths[which] = bad
    with pytest.raises(CheckpointError) as e:
        merge_checkpoints(paths["BASE"], paths["OTHER"], paths["OUT"], 0.9, progress=False)
    msg = str(e.value)
    assert msg.startswith(which) and fragment in msg and "expected" in msg, msg
    assert "\n" not in msg and "\0" not in msg
    _assert_nothing_written(tmp_path, set())
